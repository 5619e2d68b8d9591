#!/usr/bin/env python3
"""A local IBM Cloud VPC API and IAM for the ibmcloud provider's tests (loopback only).

Every request is checked against IBM's own VPC SDK for Python (`ibm-vpc`, generated from IBM's
VPC API definition):

- the method, path and query (`version`, `generation`, filters) must be exactly what the SDK
  sends for that operation: the SDK is called with the request's arguments and its prepared
  request is compared with the one received;
- a body must load into the SDK's generated model (required properties present) and come back
  out of it unchanged (no property the API does not define); union types (an identity by id,
  by name or by href; an instance by image or by volume) must match one of their forms, and
  enumerated values must be among the model's.

What it models beyond the schema, as IBM documents it: IAM's API-key token exchange and 401
without a token; instance names (the VPC's rules, unique in the region); `user_data` at most
64 KiB; an instance `pending`, then `running` with an address (`0.0.0.0` until then) or
`failed` with a status reason (`cannot_start_capacity` for a profile with no capacity); the
boot volume deleted with the instance; rate limiting (429).

GET /_emulator/state answers what exists; requests that did not validate are listed under
"invalid".
"""

import argparse
import enum
import itertools
import json
import re
import threading
import typing
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import ibm_vpc.vpc_v1 as vpc
from ibm_cloud_sdk_core.authenticators import NoAuthAuthenticator

NAME_RULE = re.compile(r"^-?([a-z]|[a-z][-a-z0-9]*[a-z0-9]|[0-9][-a-z0-9]*([a-z]|[-a-z][-a-z0-9]*[a-z0-9]))$")

# ---------------------------------------------------------------------------------------------
# Validation against the SDK's generated models.


def leaf_forms(cls):
    """The concrete forms of a union model (its subclasses with no subclasses of their own)."""
    subs = cls.__subclasses__()
    if not subs:
        return [cls]
    return [f for s in subs for f in leaf_forms(s)]


def model_of(hint):
    """The model class (or list of it) a type hint names."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        hint = next(a for a in args if a is not type(None))
        return model_of(hint)
    if origin in (list, typing.List):
        inner = model_of(args[0])
        return ("list", inner[1]) if inner else None
    if isinstance(hint, type) and hint.__module__ == vpc.__name__ and not issubclass(hint, enum.Enum):
        return ("one", hint)
    return None


def check(cls, data, path):
    """The errors of `data` as a `cls` (a union: as any one of its forms)."""
    if not isinstance(data, dict):
        return [f"{path}: expected an object ({cls.__name__})"]
    forms = leaf_forms(cls)
    if len(forms) > 1 or forms[0] is not cls:
        # The nearest form is one whose required properties are all there, if any is.
        loaded, best = False, None
        for f in forms:
            errs = check(f, data, path)
            if not errs:
                return []
            ok = not errs[0].startswith(f"{path}: ")
            if best is None or (ok and not loaded) or (ok == loaded and len(errs) < len(best)):
                loaded, best = loaded or ok, errs
        return [f"{path}: matches none of {cls.__name__}'s forms; nearest: {best[0]}"]
    try:
        obj = cls.from_dict(data)
    except (ValueError, TypeError, AttributeError) as e:
        return [f"{path}: {e}"]
    errors = []
    back = obj.to_dict()
    for k in data:
        if k not in back:
            errors.append(f"{path}.{k}: {cls.__name__} has no such property")
    hints = typing.get_type_hints(cls.__init__, vars(vpc))
    for k, v in data.items():
        if k not in hints:
            continue
        m = model_of(hints[k])
        enum_cls = getattr(cls, "".join(p.capitalize() for p in k.split("_")) + "Enum", None)
        if isinstance(enum_cls, type) and issubclass(enum_cls, enum.Enum):
            if v not in [e.value for e in enum_cls]:
                errors.append(f"{path}.{k}: {v!r} is not one of {[e.value for e in enum_cls]}")
        if m and m[0] == "one" and isinstance(v, dict):
            errors += check(m[1], v, f"{path}.{k}")
        elif m and m[0] == "list" and isinstance(v, list):
            for i, item in enumerate(v):
                errors += check(m[1], item, f"{path}.{k}[{i}]")
    return errors


def sdk_request(call):
    """The request the SDK prepares for `call(service)`."""
    svc = vpc.VpcV1(authenticator=NoAuthAuthenticator())
    svc.set_service_url("http://sdk.invalid/v1")
    captured = {}
    svc.send = lambda req, **kw: captured.setdefault("req", req)
    call(svc)
    return captured["req"]


# ---------------------------------------------------------------------------------------------
# The cloud.


class Cloud:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.instances = {}  # id -> instance
        self.user_data = {}  # id -> user_data (the API does not return it)
        self.volumes = {}
        self.gets = {}  # id -> reads since created
        self.tokens = set()
        self.tokens_issued = 0
        self.throttle_next = 0
        self.lose_next_create = False  # the next create is made and its answer lost (500)
        self.throttled = 0
        self.invalid = []
        self.addresses = (f"10.240.{i // 250}.{4 + i % 250}" for i in itertools.count())


class Handler(BaseHTTPRequestHandler):
    cloud = None

    def log_message(self, *a):
        pass

    def reply(self, status, body=None, headers=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, code, message):
        self.reply(status, {"errors": [{"code": code, "message": message, "more_info": "https://cloud.ibm.com/docs/vpc"}], "trace": str(uuid.uuid4())})

    def refuse(self, why):
        with self.cloud.lock:
            self.cloud.invalid.append(f"{self.command} {self.path}: {why}")
        self.error(400, "validation_invalid_argument", why)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def same_request(self, req, query):
        want = urllib.parse.urlsplit(req["url"])
        got = urllib.parse.urlsplit(self.path)
        if req["method"] != self.command:
            return f"method {self.command} is not the SDK's {req['method']}"
        if want.path != got.path:
            return f"path {got.path} is not the SDK's {want.path}"
        params = {k: str(v) for k, v in (req.get("params") or {}).items() if v is not None}
        if params != query:
            return f"query {query} is not the SDK's {params}"
        return None

    def do_GET(self):
        self.route()

    def do_POST(self):
        self.route()

    def do_DELETE(self):
        self.route()

    def route(self):
        c = self.cloud
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        path, method = url.path, self.command
        if path == "/_emulator/state":
            with c.lock:
                return self.reply(200, {"instances": c.instances, "user_data": c.user_data, "volumes": c.volumes, "tokens_issued": c.tokens_issued, "throttled": c.throttled, "invalid": c.invalid})
        if path == "/_emulator/throttle" and method == "POST":
            with c.lock:
                c.throttle_next = json.loads(self.body())["count"]
            return self.reply(200, {})
        if path == "/_emulator/lose-create" and method == "POST":
            with c.lock:
                c.lose_next_create = True
            return self.reply(200, {})
        if path == "/identity/token" and method == "POST":
            return self.iam()
        auth = self.headers.get("Authorization", "")
        with c.lock:
            ok = auth.startswith("Bearer ") and auth[7:] in c.tokens
            throttle = ok and c.throttle_next > 0
            if throttle:
                c.throttle_next -= 1
                c.throttled += 1
        if not ok:
            return self.error(401, "not_authorized", "The request is not authorized: no valid IAM token.")
        if throttle:
            return self.error(429, "too_many_requests", "Rate limit exceeded; try again later.")
        if path == "/v1/instances" and method == "POST":
            return self.create(query)
        if path == "/v1/instances" and method == "GET":
            req = sdk_request(lambda s: s.list_instances(start=query.get("start"), limit=int(query["limit"]) if "limit" in query else None, vpc_id=query.get("vpc.id"), name=query.get("name")))
            why = self.same_request(req, query)
            return self.refuse(why) if why else self.list(query)
        m = re.fullmatch(r"/v1/instances/([^/]+)", path)
        if m and method == "GET":
            why = self.same_request(sdk_request(lambda s: s.get_instance(m.group(1))), query)
            return self.refuse(why) if why else self.get(m.group(1))
        if m and method == "DELETE":
            why = self.same_request(sdk_request(lambda s: s.delete_instance(m.group(1))), query)
            return self.refuse(why) if why else self.delete(m.group(1))
        self.refuse(f"no such operation in the emulated API: {method} {path}")

    def iam(self):
        c, a = self.cloud, self.cloud.args
        if not (self.headers.get("Content-Type") or "").startswith("application/x-www-form-urlencoded"):
            return self.reply(400, {"errorCode": "BXNIM0109E", "errorMessage": "Property missing or empty."})
        form = dict(urllib.parse.parse_qsl(self.body().decode()))
        if form.get("grant_type") != "urn:ibm:params:oauth:grant-type:apikey":
            return self.reply(400, {"errorCode": "BXNIM0103E", "errorMessage": "Unsupported grant type."})
        if form.get("apikey") != a.api_key:
            return self.reply(400, {"errorCode": "BXNIM0415E", "errorMessage": "Provided API key could not be found."})
        token = uuid.uuid4().hex + uuid.uuid4().hex
        with c.lock:
            c.tokens.add(token)
            c.tokens_issued += 1
        self.reply(200, {"access_token": token, "refresh_token": "not_supported", "token_type": "Bearer", "expires_in": a.token_lifetime, "expiration": 0, "scope": "ibm openid"})

    def view(self, i):
        return json.loads(json.dumps(i))

    def create(self, query):
        c, a = self.cloud, self.cloud.args
        try:
            body = json.loads(self.body())
        except ValueError as e:
            return self.refuse(f"the body is not JSON: {e}")
        errors = check(vpc.InstancePrototype, body, "InstancePrototype")
        if errors:
            return self.refuse("; ".join(errors[:10]))
        form = next(f for f in leaf_forms(vpc.InstancePrototype) if not check(f, body, ""))
        req = sdk_request(lambda s: s.create_instance(form.from_dict(body)))
        why = self.same_request(req, query)
        if why is None and json.loads(req["data"]) != body:
            why = "the body is not what the SDK sends for it"
        if why:
            return self.refuse(why)
        name = body.get("name", "")
        if len(name) > 63 or not NAME_RULE.match(name):
            return self.error(400, "validation_invalid_name", f"name {name!r} does not follow the VPC's naming rules")
        if len(body.get("user_data", "")) > 64 * 1024:
            return self.error(400, "validation_user_data_too_long", "user_data is limited to 64 KiB")
        profile = body["profile"]["name"]
        with c.lock:
            if any(i["name"] == name for i in c.instances.values()):
                return self.error(409, "validation_unique_failed", f"instance name {name!r} is in use")
            iid = f"0717_{uuid.uuid4()}"
            vol = f"r006-{uuid.uuid4()}"
            c.volumes[vol] = {"instance": iid, "delete_volume_on_instance_delete": True}
            inst = {
                "id": iid,
                "crn": f"crn:v1:bluemix:public:is:{body['zone']['name']}:a/test::instance:{iid}",
                "href": f"http://{self.headers['Host']}/v1/instances/{iid}",
                "name": name,
                "status": "pending",
                "status_reasons": [],
                "profile": {"name": profile},
                "image": body["image"],
                "zone": body["zone"],
                "vpc": body.get("vpc"),
                "confidential_compute_mode": body.get("confidential_compute_mode", "disabled"),
                "metadata_service": body.get("metadata_service", {"enabled": False}),
                "primary_network_interface": {
                    "id": f"0717-{uuid.uuid4()}",
                    "name": body["primary_network_interface"].get("name", "eth0"),
                    "primary_ip": {"address": "0.0.0.0"},
                    "subnet": body["primary_network_interface"]["subnet"],
                    "security_groups": body["primary_network_interface"].get("security_groups", []),
                },
                "boot_volume_attachment": {"delete_volume_on_instance_delete": True, "volume": {"id": vol}},
            }
            c.instances[iid] = inst
            c.user_data[iid] = body.get("user_data")
            c.gets[iid] = 0
            view = self.view(inst)
            lost = c.lose_next_create
            c.lose_next_create = False
        if lost:
            # Made, but the answer never arrives as such (a gateway error after the fact).
            return self.error(500, "internal_error", "The request could not be completed.")
        self.reply(201, view)

    def advance(self, iid):
        """An instance moves on each time it is read."""
        c, a = self.cloud, self.cloud.args
        inst = c.instances[iid]
        c.gets[iid] += 1
        if inst["status"] == "pending" and c.gets[iid] > a.polls:
            if inst["profile"]["name"] in a.no_capacity:
                inst["status"] = "failed"
                inst["status_reasons"] = [{"code": "cannot_start_capacity", "message": f"Insufficient capacity for profile {inst['profile']['name']} in zone {inst['zone']['name']}."}]
            else:
                inst["status"] = "running"
                inst["primary_network_interface"]["primary_ip"]["address"] = next(c.addresses)

    def get(self, iid):
        c = self.cloud
        with c.lock:
            if iid not in c.instances:
                return self.error(404, "not_found", f"Instance not found: {iid}")
            self.advance(iid)
            view = self.view(c.instances[iid])
        self.reply(200, view)

    def list(self, query):
        c = self.cloud
        limit = int(query.get("limit", "50"))
        start = int(query.get("start", "0") or 0)
        with c.lock:
            items = [self.view(i) for i in c.instances.values() if query.get("vpc.id") in (None, (i.get("vpc") or {}).get("id")) and query.get("name") in (None, i["name"])]
        page = items[start : start + limit]
        out = {"instances": page, "limit": limit, "total_count": len(items), "first": {"href": f"http://{self.headers['Host']}/v1/instances?limit={limit}"}}
        if start + limit < len(items):
            q = dict(query)
            q["start"] = str(start + limit)
            out["next"] = {"href": f"http://{self.headers['Host']}/v1/instances?{urllib.parse.urlencode(q)}"}
        self.reply(200, out)

    def delete(self, iid):
        c = self.cloud
        with c.lock:
            inst = c.instances.pop(iid, None)
            if inst is None:
                return self.error(404, "not_found", f"Instance not found: {iid}")
            for v, vol in list(c.volumes.items()):
                if vol["instance"] == iid and vol["delete_volume_on_instance_delete"]:
                    del c.volumes[v]
            c.user_data.pop(iid, None)
        self.reply(204)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api-key", default="coffer-test-api-key")
    p.add_argument("--token-lifetime", type=int, default=3600)
    p.add_argument("--polls", type=int, default=1, help="reads of a new instance before it runs")
    p.add_argument("--no-capacity", action="append", default=[], help="a profile that cannot start")
    args = p.parse_args()
    Handler.cloud = Cloud(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
