"""A local SSM-compatible endpoint for the tests (moto implements none of the
activation or managed-node calls), serving IAM beside it (iam_query.py: the
Query-protocol requests, those without X-Amz-Target): the JSON 1.1 protocol (`POST /`,
`X-Amz-Target: AmazonSSM.<Op>`), state kept in memory, limits and errors as AWS
documents them. Signatures are not checked. Loopback only; stops by itself after
LIFETIME seconds (default 300).

    ssm_stub.py PORT_FILE LOG_FILE [THROTTLE_FIRST_N [LIFETIME]]

An IamRole named "NoPassRole" answers AccessDenied as a missing iam:PassRole does;
the access key id ASIAEXPIREDEXPIRED00 is answered as expired session credentials.
SSM_STUB_SLOW_CREATE=SECONDS in the environment makes CreateActivation answer that
much later, the activation made already (for timeouts, shutdown with requests in
flight, and a broker killed between SSM making an activation and recording it).
Each request is appended to LOG_FILE as a JSON line (target and body; bodies
holding an ActivationCode are logged with it masked).

Registration follows the agent's side of the protocol: RegisterManagedInstance
with the activation's id and code (registration limit and expiry enforced; the
activation's tags carry over to the node, as AWS does), then
UpdateInstanceInformation pings. A node is Online while it pinged in the last
five minutes. One operation is not AWS's: `PiprovTest.Backdate` {InstanceId,
Seconds} moves a node's ping and registration times into the past, so tests can
make a node that has been offline for weeks. Service settings start as a new
account's: the activation tier is `standard` until UpdateServiceSetting changes it.
"""
import json
import os
import re
import secrets
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import iam_query

port_file, log_path = sys.argv[1], sys.argv[2]
throttle_left = int(sys.argv[3]) if len(sys.argv) > 3 else 0
lifetime = float(sys.argv[4]) if len(sys.argv) > 4 else 300
slow_create = float(os.environ.get("SSM_STUB_SLOW_CREATE", "0"))
activations = {}
codes = {}
nodes = {}
lock = threading.Lock()
MAX_LIFETIME = 30 * 24 * 3600
ONLINE_WINDOW = 300
# AWS's pattern for tag keys and values and for DefaultInstanceName.
TAG_TEXT = re.compile(r"^[\w\s.:/=+\-@]*$")


class Error(Exception):
    def __init__(self, kind, message, status=400):
        self.kind, self.message, self.status = kind, message, status


def create_activation(body):
    role = body.get("IamRole")
    if not role:
        raise Error("ValidationException", "1 validation error detected: Value null at 'iamRole' failed to satisfy constraint: Member must not be null")
    if role == "NoPassRole":
        raise Error("AccessDeniedException", "User: arn:aws:iam::123456789012:user/dev is not authorized to perform: iam:PassRole on resource: arn:aws:iam::123456789012:role/NoPassRole")
    for tag in body.get("Tags", []):
        key, value = tag.get("Key", ""), tag.get("Value", "")
        if not 1 <= len(key) <= 128 or len(value) > 256 or not TAG_TEXT.match(key) or not TAG_TEXT.match(value):
            raise Error("ValidationException", f"1 validation error detected: Value '{key}={value}' at 'tags' failed to satisfy constraint: Member must satisfy regular expression pattern: ^([\\p{{L}}\\p{{Z}}\\p{{N}}_.:/=+\\-@]*)$")
    if not TAG_TEXT.match(body.get("DefaultInstanceName", "")):
        raise Error("ValidationException", "1 validation error detected: Value at 'defaultInstanceName' failed to satisfy constraint: Member must satisfy regular expression pattern: ^([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)$")
    limit = body.get("RegistrationLimit", 1)
    if not 1 <= limit <= 1000:
        raise Error("ValidationException", "RegistrationLimit must be between 1 and 1000")
    now = time.time()
    expires = body.get("ExpirationDate", now + 24 * 3600)
    if expires <= now or expires > now + MAX_LIFETIME + 60:
        raise Error("ValidationException", "ExpirationDate must be in the future and at most 30 days away")
    activation_id = str(uuid.uuid4())
    code = secrets.token_urlsafe(15)
    codes[activation_id] = code
    activations[activation_id] = {
        "ActivationId": activation_id,
        "Description": body.get("Description", ""),
        "DefaultInstanceName": body.get("DefaultInstanceName", ""),
        "IamRole": role,
        "RegistrationLimit": limit,
        "RegistrationsCount": 0,
        "ExpirationDate": expires,
        "CreatedDate": now,
        "Tags": body.get("Tags", []),
    }
    return {"ActivationId": activation_id, "ActivationCode": code}


def describe_activations(body):
    items = sorted(activations.values(), key=lambda a: a["CreatedDate"])
    start = int(body.get("NextToken") or 0)
    size = body.get("MaxResults", 2)  # small pages, so the client must follow NextToken
    page = items[start:start + size]
    out = [dict(a, Expired=a["ExpirationDate"] < time.time()) for a in page]
    reply = {"ActivationList": out}
    if start + size < len(items):
        reply["NextToken"] = str(start + size)
    return reply


def delete_activation(body):
    activation_id = body.get("ActivationId")
    if activation_id not in activations:
        raise Error("InvalidActivationId", f"The activation ID {activation_id} is not valid.")
    del activations[activation_id]
    return {}


def register_managed_instance(body):
    activation_id = body.get("ActivationId")
    activation = activations.get(activation_id)
    if activation is None or codes.get(activation_id) != body.get("ActivationCode"):
        raise Error("InvalidActivation", "Activation ID or Code is not valid.")
    # The error types of RegisterManagedInstance (the agent's vendored SDK model).
    if activation["ExpirationDate"] < time.time():
        raise Error("ActivationExpired", "Activation has expired.")
    if activation["RegistrationsCount"] >= activation["RegistrationLimit"]:
        raise Error("RegistrationLimitExceeded", "Activation has reached its registration limit.")
    activation["RegistrationsCount"] += 1
    instance_id = "mi-" + secrets.token_hex(9)[:17]
    now = time.time()
    nodes[instance_id] = {
        "InstanceId": instance_id,
        "ActivationId": activation_id,
        "IamRole": activation["IamRole"],
        "Name": activation["DefaultInstanceName"],
        "RegistrationDate": now,
        "LastPingDateTime": None,
        "ResourceType": "ManagedInstance",
        "Tags": [dict(t) for t in activation["Tags"]],
    }
    return {"InstanceId": instance_id}


def node(body):
    instance_id = body.get("InstanceId") or body.get("ResourceId")
    if instance_id not in nodes:
        raise Error("InvalidInstanceId", f"Instance {instance_id} is not valid.")
    return nodes[instance_id]


def update_instance_information(body):
    found = node(body)
    for key in ("AgentVersion", "ComputerName", "IPAddress", "PlatformName", "PlatformType", "PlatformVersion"):
        if key in body:
            found[key] = body[key]
    found["LastPingDateTime"] = time.time()
    return {}


def ping_status(found):
    last = found["LastPingDateTime"]
    return "Online" if last is not None and time.time() - last < ONLINE_WINDOW else "ConnectionLost"


def describe_instance_information(body):
    items = sorted(nodes.values(), key=lambda n: n["RegistrationDate"])
    for f in body.get("Filters", []):
        key, values = f.get("Key", ""), f.get("Values", [])
        if key.startswith("tag:"):
            tag = key[4:]
            items = [n for n in items if any(t["Key"] == tag and t["Value"] in values for t in n["Tags"])]
        elif key == "PingStatus":
            items = [n for n in items if ping_status(n) in values]
        elif key == "ResourceType":
            items = [n for n in items if n["ResourceType"] in values]
        elif key == "InstanceIds":
            items = [n for n in items if n["InstanceId"] in values]
        else:
            raise Error("InvalidInstanceInformationFilterValue", f"filter key {key} is not supported here")
    start = int(body.get("NextToken") or 0)
    size = body.get("MaxResults", 2)  # small pages, so the client must follow NextToken
    page = items[start:start + size]
    out = []
    for n in page:
        info = {k: v for k, v in n.items() if k != "Tags" and v is not None}
        info["PingStatus"] = ping_status(n)
        out.append(info)
    reply = {"InstanceInformationList": out}
    if start + size < len(items):
        reply["NextToken"] = str(start + size)
    return reply


def list_tags_for_resource(body):
    if body.get("ResourceType") != "ManagedInstance":
        raise Error("InvalidResourceType", "only ManagedInstance is kept here")
    return {"TagList": node(body)["Tags"]}


def add_tags_to_resource(body):
    if body.get("ResourceType") != "ManagedInstance":
        raise Error("InvalidResourceType", "only ManagedInstance is kept here")
    found = node(body)
    for tag in body.get("Tags", []):
        found["Tags"] = [t for t in found["Tags"] if t["Key"] != tag["Key"]] + [tag]
    return {}


def deregister_managed_instance(body):
    node(body)
    del nodes[body["InstanceId"]]
    return {}


def backdate(body):
    found = node(body)
    seconds = body["Seconds"]
    found["RegistrationDate"] -= seconds
    if found["LastPingDateTime"] is not None:
        found["LastPingDateTime"] -= seconds
    return {}


# Service settings as a new account has them: the standard-instances tier.
TIER = "/ssm/managed-instance/activation-tier"
settings = {TIER: {"value": "standard", "status": "Default"}}


def setting_id(body):
    wanted = body.get("SettingId", "")
    # By name or by ARN (arn:aws:ssm:REGION:ACCOUNT:servicesetting/ssm/...).
    name = wanted.split(":servicesetting", 1)[-1] if ":servicesetting" in wanted else wanted
    if name not in settings:
        raise Error("ServiceSettingNotFound", f"ServiceSetting {wanted} is not found", 400)
    return name


def get_service_setting(body):
    name = setting_id(body)
    found = settings[name]
    return {"ServiceSetting": {
        "SettingId": name,
        "SettingValue": found["value"],
        "ARN": f"arn:aws:ssm:us-east-1:123456789012:servicesetting{name}",
        "Status": found["status"],
        "LastModifiedDate": time.time(),
        "LastModifiedUser": "System",
    }}


def update_service_setting(body):
    name = setting_id(body)
    value = body.get("SettingValue", "")
    if name == TIER and value not in ("standard", "advanced"):
        raise Error("ValidationException", f"Invalid value {value} for {name}: standard or advanced")
    settings[name] = {"value": value, "status": "Customized"}
    return {}


OPERATIONS = {
    "AmazonSSM.GetServiceSetting": get_service_setting,
    "AmazonSSM.UpdateServiceSetting": update_service_setting,
    "AmazonSSM.CreateActivation": create_activation,
    "AmazonSSM.DescribeActivations": describe_activations,
    "AmazonSSM.DeleteActivation": delete_activation,
    "AmazonSSM.RegisterManagedInstance": register_managed_instance,
    "AmazonSSM.UpdateInstanceInformation": update_instance_information,
    "AmazonSSM.DescribeInstanceInformation": describe_instance_information,
    "AmazonSSM.ListTagsForResource": list_tags_for_resource,
    "AmazonSSM.AddTagsToResource": add_tags_to_resource,
    "AmazonSSM.DeregisterManagedInstance": deregister_managed_instance,
    "PiprovTest.Backdate": backdate,
}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global throttle_left
        target = self.headers.get("X-Amz-Target", "")
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not target and self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            return self.iam(raw)
        body = json.loads(raw or b"{}")
        logged = dict(body, ActivationCode="***") if "ActivationCode" in body else body
        try:
            with lock:
                with open(log_path, "a") as log:
                    log.write(json.dumps({"target": target, "body": logged}) + "\n")
            with lock:
                if "Credential=ASIAEXPIREDEXPIRED00/" in self.headers.get("Authorization", ""):
                    raise Error("ExpiredTokenException", "The security token included in the request is expired")
                if throttle_left > 0:
                    throttle_left -= 1
                    raise Error("ThrottlingException", "Rate exceeded")
                if target not in OPERATIONS:
                    raise Error("UnknownOperationException", f"{target} is not implemented here")
                result = OPERATIONS[target](body)
            # Made, then answered late (outside the lock): a caller can be caught
            # between SSM making the activation and hearing of it.
            if target == "AmazonSSM.CreateActivation" and slow_create:
                time.sleep(slow_create)
            self.reply(200, result)
        except Error as e:
            self.reply(e.status, {"__type": e.kind, "message": e.message})

    def iam(self, raw):
        with lock:
            status, xml, form = iam_query.handle(raw, self.headers.get("Authorization", ""))
            with open(log_path, "a") as log:
                log.write(json.dumps({"target": "IAM." + form.get("Action", ""), "body": form}) + "\n")
        data = xml.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


# Many clients at once (the broker load test): a deep accept queue, so none is reset.
ThreadingHTTPServer.request_queue_size = 512
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(port_file, "w") as f:
    f.write(str(server.server_address[1]))
server.timeout = 1
deadline = time.time() + lifetime
while time.time() < deadline:
    server.handle_request()
