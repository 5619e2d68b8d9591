#!/usr/bin/env python3
"""A local Azure Resource Manager for the azure provider's tests (loopback only).

Every request is checked against Microsoft's own Azure SDK for Python, which is generated from
the published Azure REST API specifications (azure-rest-api-specs) and carries them as data:

- the method, path and query of each call must be exactly what the SDK's request builder for
  that operation makes (`azure.mgmt.compute` at api-version 2024-07-01, `azure.mgmt.network`);
- a body is walked against the SDK's generated model metadata (`_attribute_map`: every property
  the spec defines, with its wire name and type; `_validation`: required, read-only and the
  constraints), so an unknown property, a wrong type, a missing required or a sent read-only
  property is refused with 400 as ARM does.

What it models beyond the schema, as Azure's documentation describes it: OAuth tokens (client
credentials at the identity platform, the managed identity endpoint of the instance metadata
service) and 401 without one; long-running PUT and DELETE answered 201/202 with an
`Azure-AsyncOperation` URL that reports `InProgress` then `Succeeded` or `Failed` (with
`Retry-After`); throttling (429 + `Retry-After`); allocation failure (the operation fails with
`AllocationFailed` and the VM stays, Failed, until deleted); quota refusal (409
`OperationNotAllowed`); `deleteOption` on the NIC and OS disk that are made with the VM; the
documented limits on tags and `userData`.

GET /_emulator/state answers what exists (for the test's assertions), and every request that did
not validate is listed there under "invalid".
"""

import argparse
import base64
import binascii
import itertools
import json
import re
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from azure.mgmt.compute._serialization import Model
from azure.mgmt.compute.v2024_07_01 import models as compute_models
from azure.mgmt.compute.v2024_07_01.operations import _operations as compute_ops
from azure.mgmt.network.operations import _operations as network_ops

MODELS = {
    name: cls
    for name, cls in vars(compute_models).items()
    if isinstance(cls, type) and issubclass(cls, Model)
}

# ---------------------------------------------------------------------------------------------
# Validation against the SDK's generated model metadata.


def split_key(key):
    """msrest flattens `properties.x` into one attribute; a literal dot is escaped."""
    return [p.replace("\\.", ".") for p in re.split(r"(?<!\\)\.", key)]


def check_type(kind, value, path, errors):
    if value is None:
        return
    if kind.startswith("[") and kind.endswith("]"):
        if not isinstance(value, list):
            errors.append(f"{path}: expected an array")
            return
        for i, v in enumerate(value):
            check_type(kind[1:-1], v, f"{path}[{i}]", errors)
    elif kind.startswith("{") and kind.endswith("}"):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object")
            return
        for k, v in value.items():
            check_type(kind[1:-1], v, f"{path}.{k}", errors)
    elif kind in ("str", "iso-8601", "rfc-1123", "duration", "date", "base64", "bytearray", "unix-time"):
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {json.dumps(value)}")
    elif kind in ("int", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(f"{path}: expected an integer, got {json.dumps(value)}")
    elif kind == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errors.append(f"{path}: expected a number")
    elif kind == "bool":
        if not isinstance(value, bool):
            errors.append(f"{path}: expected a boolean, got {json.dumps(value)}")
    elif kind == "object":
        pass
    elif kind in MODELS:
        check_model(kind, value, path, errors)
    else:
        errors.append(f"{path}: the SDK has no type {kind!r}")


def check_rules(rules, value, path, errors):
    if isinstance(value, str):
        if "max_length" in rules and len(value) > rules["max_length"]:
            errors.append(f"{path}: longer than {rules['max_length']}")
        if "min_length" in rules and len(value) < rules["min_length"]:
            errors.append(f"{path}: shorter than {rules['min_length']}")
        if "pattern" in rules and not re.match(rules["pattern"], value):
            errors.append(f"{path}: does not match {rules['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "maximum" in rules and value > rules["maximum"]:
            errors.append(f"{path}: above {rules['maximum']}")
        if "minimum" in rules and value < rules["minimum"]:
            errors.append(f"{path}: below {rules['minimum']}")
    if isinstance(value, list):
        if "max_items" in rules and len(value) > rules["max_items"]:
            errors.append(f"{path}: more than {rules['max_items']} items")
        if "min_items" in rules and len(value) < rules["min_items"]:
            errors.append(f"{path}: fewer than {rules['min_items']} items")


def check_unknown(data, paths, where, model, errors):
    """Every key of `data` must start one of `paths` (the model's flattened wire keys)."""
    for k, v in data.items():
        tails = [p[1:] for p in paths if p[0] == k]
        if not tails:
            errors.append(f"{where}.{k}: {model} has no such property")
        elif all(tails) and isinstance(v, dict):
            check_unknown(v, tails, f"{where}.{k}", model, errors)


def check_model(name, data, path, errors):
    cls = MODELS[name]
    if not isinstance(data, dict):
        errors.append(f"{path}: expected an object ({name})")
        return
    keys = []
    for attr, desc in cls._attribute_map.items():
        if not desc["key"]:
            continue  # additional properties
        parts = split_key(desc["key"])
        keys.append(parts)
        rules = cls._validation.get(attr, {})
        cur, present = data, True
        for p in parts:
            if isinstance(cur, dict) and p in cur:
                cur = cur[p]
            else:
                present = False
                break
        where = f"{path}.{desc['key']}"
        if rules.get("required") and not present:
            errors.append(f"{where}: required by {name}, missing")
        if present and rules.get("readonly"):
            errors.append(f"{where}: read-only in {name}, must not be sent")
        if present:
            check_type(desc["type"], cur, where, errors)
            check_rules(rules, cur, where, errors)
    check_unknown(data, keys, path, name, errors)


# ---------------------------------------------------------------------------------------------
# The cloud.


class Cloud:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.vms = {}  # name -> resource (as stored, userData included)
        self.nics = {}
        self.disks = {}
        self.ops = {}  # id -> operation
        self.tokens = {}  # token -> identity
        self.tokens_issued = 0
        self.throttle_next = 0
        self.throttled = 0
        self.invalid = []
        self.requests = []
        self.addresses = (f"10.1.{i // 250}.{4 + i % 250}" for i in itertools.count())

    def state(self):
        return {
            "vms": self.vms,
            "nics": self.nics,
            "disks": self.disks,
            "tokens_issued": self.tokens_issued,
            "throttled": self.throttled,
            "invalid": self.invalid,
            "requests": self.requests,
        }


def arm_error(code, message):
    return {"error": {"code": code, "message": message}}


class Handler(BaseHTTPRequestHandler):
    cloud = None

    def log_message(self, *a):
        pass

    # -- plumbing -------------------------------------------------------------------------------

    def reply(self, status, body=None, headers=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def refuse(self, why):
        c = self.cloud
        with c.lock:
            c.invalid.append(f"{self.command} {self.path}: {why}")
        self.reply(400, arm_error("InvalidRequestContent", why))

    def base(self):
        return f"http://{self.headers['Host']}"

    def same_request(self, built, query):
        """The request must be exactly what the SDK's builder makes: path and query."""
        want = urllib.parse.urlsplit(built.url)
        got = urllib.parse.urlsplit(self.path)
        if urllib.parse.unquote(want.path) != urllib.parse.unquote(got.path):
            return f"path {got.path} is not the SDK's {want.path}"
        wq = dict(urllib.parse.parse_qsl(want.query))
        if wq != query:
            return f"query {query} is not the SDK's {wq}"
        return None

    # -- routes ---------------------------------------------------------------------------------

    def do_GET(self):
        self.route("GET")

    def do_PUT(self):
        self.route("PUT")

    def do_DELETE(self):
        self.route("DELETE")

    def do_POST(self):
        self.route("POST")

    def route(self, method):
        c, a = self.cloud, self.cloud.args
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        path = url.path
        if path == "/_emulator/state":
            with c.lock:
                return self.reply(200, c.state())
        if path == "/_emulator/throttle" and method == "POST":
            with c.lock:
                c.throttle_next = json.loads(self.body())["count"]
            return self.reply(200, {})
        if method == "POST" and path == f"/{a.tenant}/oauth2/v2.0/token":
            return self.token_client_credentials()
        if method == "GET" and path == "/metadata/identity/oauth2/token":
            return self.token_managed_identity(query)
        # Everything else is ARM: a bearer token first.
        auth = self.headers.get("Authorization", "")
        with c.lock:
            ok = auth.startswith("Bearer ") and auth[7:] in c.tokens
            c.requests.append(f"{method} {path}")
            throttle = ok and c.throttle_next > 0
            if throttle:
                c.throttle_next -= 1
                c.throttled += 1
        if not ok:
            return self.reply(
                401,
                arm_error("InvalidAuthenticationToken", "The access token is invalid."),
                {"WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/"'},
            )
        if throttle:
            return self.reply(
                429,
                arm_error("TooManyRequests", "The request is being throttled."),
                {"Retry-After": "1"},
            )
        sub, rg = a.subscription, a.resource_group
        vm_prefix = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines"
        nic_prefix = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces/"
        op_prefix = f"/subscriptions/{sub}/providers/Microsoft.Compute/locations/{a.location}/operations/"
        if path == vm_prefix and method == "GET":
            built = compute_ops.build_virtual_machines_list_request(
                rg, sub, expand=query.get("$expand"), filter=query.get("$filter")
            )
            # A nextLink is the server's own (its $skiptoken), followed as it is.
            why = self.same_request(built, {k: v for k, v in query.items() if k != "$skiptoken"})
            if why is None and "$expand" in query and query["$expand"] not in [
                e.value for e in compute_models.ExpandTypeForListVMs
            ]:
                why = f"$expand {query['$expand']!r} is not one of the spec's"
            return self.refuse(why) if why else self.list_vms(query)
        if path.startswith(vm_prefix + "/"):
            name = path[len(vm_prefix) + 1 :]
            if method == "PUT":
                built = compute_ops.build_virtual_machines_create_or_update_request(
                    rg, name, sub, content_type="application/json"
                )
                why = self.same_request(built, query)
                return self.refuse(why) if why else self.put_vm(name)
            if method == "GET":
                built = compute_ops.build_virtual_machines_get_request(
                    rg, name, sub, expand=query.get("$expand")
                )
                why = self.same_request(built, query)
                return self.refuse(why) if why else self.get_vm(name, query)
            if method == "DELETE":
                force = query.get("forceDeletion")
                built = compute_ops.build_virtual_machines_delete_request(
                    rg, name, sub, force_deletion=None if force is None else force == "true"
                )
                why = self.same_request(built, query)
                return self.refuse(why) if why else self.delete_vm(name)
        if path.startswith(nic_prefix) and method == "GET":
            name = path[len(nic_prefix) :]
            built = network_ops.build_network_interfaces_get_request(rg, name, sub)
            why = self.same_request(built, query)
            if why:
                return self.refuse(why)
            with c.lock:
                nic = c.nics.get(name)
            if nic is None:
                return self.reply(404, arm_error("NotFound", f"Resource {name} not found."))
            return self.reply(200, nic)
        if path.startswith(op_prefix) and method == "GET":
            return self.operation(path[len(op_prefix) :], query)
        self.refuse(f"no such operation in the emulated API: {method} {path}")

    # -- identity -------------------------------------------------------------------------------

    def issue(self, who):
        c = self.cloud
        token = base64.urlsafe_b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode()
        with c.lock:
            c.tokens[token] = who
            c.tokens_issued += 1
        return token

    def token_client_credentials(self):
        a = self.cloud.args
        form = dict(urllib.parse.parse_qsl(self.body().decode()))
        if form.get("grant_type") != "client_credentials":
            return self.reply(400, {"error": "unsupported_grant_type", "error_description": "AADSTS70003: grant_type must be client_credentials."})
        if form.get("scope") != "https://management.azure.com/.default":
            return self.reply(400, {"error": "invalid_scope", "error_description": "AADSTS70011: The provided value for the input parameter 'scope' is not valid."})
        if form.get("client_id") != a.client_id or form.get("client_secret") != a.client_secret:
            return self.reply(401, {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."})
        token = self.issue(f"sp:{a.client_id}")
        self.reply(200, {"token_type": "Bearer", "expires_in": a.token_lifetime, "ext_expires_in": a.token_lifetime, "access_token": token})

    def token_managed_identity(self, query):
        a = self.cloud.args
        if self.headers.get("Metadata") != "true":
            return self.reply(400, {"error": "invalid_request", "error_description": "Required metadata header not specified"})
        if query.get("api-version") != "2018-02-01" or query.get("resource") != "https://management.azure.com/":
            return self.reply(400, {"error": "invalid_request", "error_description": f"bad query {query}"})
        token = self.issue("managed-identity")
        self.reply(200, {"access_token": token, "expires_in": str(a.token_lifetime), "resource": query["resource"], "token_type": "Bearer"})

    # -- virtual machines -----------------------------------------------------------------------

    def vm_view(self, vm, query):
        v = json.loads(json.dumps(vm))
        v["properties"].pop("userData", None)  # returned only with $expand=userData
        if query.get("$expand") == "instanceView":
            state = v["properties"]["provisioningState"]
            statuses = [{"code": f"ProvisioningState/{state.lower()}"}]
            if state == "Succeeded":
                statuses.append({"code": "PowerState/running"})
            v["properties"]["instanceView"] = {"statuses": statuses}
        return v

    def put_vm(self, name):
        c, a = self.cloud, self.cloud.args
        raw = self.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            return self.refuse(f"the body is not JSON: {e}")
        errors = []
        check_model("VirtualMachine", body, "VirtualMachine", errors)
        if errors:
            return self.refuse("; ".join(errors[:10]))
        p = body.get("properties", {})
        # What the documentation adds to the schema.
        if body.get("location") != a.location:
            return self.refuse(f"location {body.get('location')!r}: the resource group is in {a.location}")
        tags = body.get("tags", {})
        if len(tags) > 50 or any(len(k) > 512 or len(v) > 256 or re.search(r"[<>%&\\?/]", k) for k, v in tags.items()):
            return self.reply(400, arm_error("InvalidTagNameCharacters", "tag names may not contain <, >, %, &, \\, ?, / and are limited to 512 characters, values to 256"))
        ud = p.get("userData")
        if ud is not None:
            try:
                base64.b64decode(ud, validate=True)
            except binascii.Error:
                return self.reply(400, arm_error("InvalidParameter", "userData must be base64"))
            if len(ud) > 65536:
                return self.reply(400, arm_error("InvalidParameter", "The value of parameter userData is too long (64 KB at most)."))
        sec = p.get("securityProfile", {})
        disk = p.get("storageProfile", {}).get("osDisk", {})
        if sec.get("securityType") == "ConfidentialVM":
            if not sec.get("uefiSettings", {}).get("vTpmEnabled"):
                return self.reply(400, arm_error("InvalidParameter", "Confidential VMs require vTPM (securityProfile.uefiSettings.vTpmEnabled)."))
            if not disk.get("managedDisk", {}).get("securityProfile", {}).get("securityEncryptionType"):
                return self.reply(400, arm_error("InvalidParameter", "Confidential VMs require osDisk.managedDisk.securityProfile.securityEncryptionType."))
        size = p.get("hardwareProfile", {}).get("vmSize")
        if size in a.no_quota:
            return self.reply(409, arm_error("OperationNotAllowed", f"Operation could not be completed as it results in exceeding approved {size} Cores quota. Additional details - Deployment Model: Resource Manager, Location: {a.location}, Current Limit: 0."))
        nic_cfgs = p.get("networkProfile", {}).get("networkInterfaceConfigurations", [])
        with c.lock:
            if name in c.vms:
                old = c.vms[name]
                return self.reply(200, self.vm_view(old, {}))
            vm_id = f"/subscriptions/{a.subscription}/resourceGroups/{a.resource_group}/providers/Microsoft.Compute/virtualMachines/{name}"
            vm = json.loads(json.dumps(body))
            vm.update({"id": vm_id, "name": name, "type": "Microsoft.Compute/virtualMachines"})
            vm["properties"]["provisioningState"] = "Creating"
            vm["properties"]["vmId"] = str(uuid.uuid4())
            nics = []
            for cfg in nic_cfgs:
                nic_name = f"{name}-{cfg['name']}"
                nic_id = f"/subscriptions/{a.subscription}/resourceGroups/{a.resource_group}/providers/Microsoft.Network/networkInterfaces/{nic_name}"
                ipcs = [
                    {"name": ip["name"], "properties": {"primary": ip.get("properties", {}).get("primary", False), "privateIPAddress": next(c.addresses), "privateIPAllocationMethod": "Dynamic", "subnet": ip.get("properties", {}).get("subnet")}}
                    for ip in cfg.get("properties", {}).get("ipConfigurations", [])
                ]
                c.nics[nic_name] = {"id": nic_id, "name": nic_name, "location": a.location, "properties": {"ipConfigurations": ipcs, "virtualMachine": {"id": vm_id}}, "deleteOption": cfg.get("properties", {}).get("deleteOption", "Detach")}
                nics.append({"id": nic_id, "properties": {"primary": cfg.get("properties", {}).get("primary", False), "deleteOption": cfg.get("properties", {}).get("deleteOption", "Detach")}})
            vm["properties"].setdefault("networkProfile", {})["networkInterfaces"] = nics
            disk_name = f"{name}_OsDisk_1_{uuid.uuid4().hex}"
            c.disks[disk_name] = {"vm": name, "deleteOption": disk.get("deleteOption", "Detach"), "securityEncryptionType": disk.get("managedDisk", {}).get("securityProfile", {}).get("securityEncryptionType")}
            vm["properties"]["storageProfile"]["osDisk"]["name"] = disk_name
            c.vms[name] = vm
            op = str(uuid.uuid4())
            c.ops[op] = {"kind": "create", "vm": name, "polls": a.polls, "size": size}
            view = self.vm_view(vm, {})
        self.reply(201, view, self.async_headers(op))

    def async_headers(self, op):
        a = self.cloud.args
        return {
            "Azure-AsyncOperation": f"{self.base()}/subscriptions/{a.subscription}/providers/Microsoft.Compute/locations/{a.location}/operations/{op}?api-version=2024-07-01",
            "Retry-After": "1",
        }

    def get_vm(self, name, query):
        with self.cloud.lock:
            vm = self.cloud.vms.get(name)
            view = vm and self.vm_view(vm, query)
        if vm is None:
            return self.reply(404, arm_error("ResourceNotFound", f"The Resource 'Microsoft.Compute/virtualMachines/{name}' under resource group '{self.cloud.args.resource_group}' was not found."))
        self.reply(200, view)

    def list_vms(self, query):
        c, a = self.cloud, self.cloud.args
        with c.lock:
            views = [self.vm_view(v, query) for _, v in sorted(c.vms.items())]
        # Paged, as ARM pages: nextLink until the last page.
        start = int(query.get("$skiptoken", "0") or 0)
        page = views[start : start + a.page]
        out = {"value": page}
        if start + a.page < len(views):
            q = dict(query)
            q["$skiptoken"] = str(start + a.page)
            out["nextLink"] = f"{self.base()}{urllib.parse.urlsplit(self.path).path}?{urllib.parse.urlencode(q)}"
        self.reply(200, out)

    def delete_vm(self, name):
        c = self.cloud
        with c.lock:
            if name not in c.vms:
                return self.reply(204)
            c.vms[name]["properties"]["provisioningState"] = "Deleting"
            op = str(uuid.uuid4())
            c.ops[op] = {"kind": "delete", "vm": name, "polls": c.args.polls}
        self.reply(202, None, self.async_headers(op))

    def operation(self, op_id, query):
        c, a = self.cloud, self.cloud.args
        if query != {"api-version": "2024-07-01"}:
            return self.refuse(f"operation status query {query}")
        with c.lock:
            op = c.ops.get(op_id)
            if op is None:
                return self.reply(404, arm_error("NotFound", "no such operation"))
            if op["polls"] > 0:
                op["polls"] -= 1
                return self.reply(200, {"name": op_id, "status": "InProgress"}, {"Retry-After": "1"})
            vm = c.vms.get(op["vm"])
            if op["kind"] == "create":
                if vm is None:
                    return self.reply(200, {"name": op_id, "status": "Canceled"})
                if op["size"] in a.no_capacity:
                    vm["properties"]["provisioningState"] = "Failed"
                    return self.reply(200, {"name": op_id, "status": "Failed", "error": {"code": "AllocationFailed", "message": "Allocation failed. We do not have sufficient capacity for the requested VM size in this region."}})
                vm["properties"]["provisioningState"] = "Succeeded"
                return self.reply(200, {"name": op_id, "status": "Succeeded"})
            # delete: the VM goes, and what was made with it to be deleted with it.
            if vm is not None:
                del c.vms[op["vm"]]
                for n, nic in list(c.nics.items()):
                    if nic["properties"]["virtualMachine"]["id"].endswith("/" + op["vm"]):
                        if nic["deleteOption"] == "Delete":
                            del c.nics[n]
                        else:
                            nic["properties"].pop("virtualMachine")
                for n, d in list(c.disks.items()):
                    if d["vm"] == op["vm"]:
                        if d["deleteOption"] == "Delete":
                            del c.disks[n]
                        else:
                            d["vm"] = None
            return self.reply(200, {"name": op_id, "status": "Succeeded"})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--subscription", default="00000000-0000-0000-0000-000000000001")
    p.add_argument("--resource-group", default="coffer-pods")
    p.add_argument("--location", default="eastus")
    p.add_argument("--tenant", default="72f988bf-0000-0000-0000-000000000000")
    p.add_argument("--client-id", default="coffer-test-client")
    p.add_argument("--client-secret", default="s3cret-for-tests")
    p.add_argument("--token-lifetime", type=int, default=3599)
    p.add_argument("--polls", type=int, default=1, help="InProgress answers before an operation ends")
    p.add_argument("--page", type=int, default=5, help="VMs per page of a list")
    p.add_argument("--no-capacity", action="append", default=[], help="a VM size whose allocation fails")
    p.add_argument("--no-quota", action="append", default=[], help="a VM size over quota")
    args = p.parse_args()
    Handler.cloud = Cloud(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
