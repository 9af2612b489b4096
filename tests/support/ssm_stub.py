"""A local SSM-compatible endpoint for the tests (moto implements none of the
activation calls): the JSON 1.1 protocol (`POST /`, `X-Amz-Target:
AmazonSSM.<Op>`), state kept in memory, limits and errors as AWS documents them.
Signatures are not checked. Loopback only; stops by itself after five minutes.

    ssm_stub.py PORT_FILE LOG_FILE [THROTTLE_FIRST_N]

An IamRole named "NoPassRole" answers AccessDenied as a missing iam:PassRole does.
Each request is appended to LOG_FILE as a JSON line (target and body).
"""
import json
import secrets
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port_file, log_path = sys.argv[1], sys.argv[2]
throttle_left = int(sys.argv[3]) if len(sys.argv) > 3 else 0
activations = {}
MAX_LIFETIME = 30 * 24 * 3600


class Error(Exception):
    def __init__(self, kind, message, status=400):
        self.kind, self.message, self.status = kind, message, status


def create_activation(body):
    role = body.get("IamRole")
    if not role:
        raise Error("ValidationException", "1 validation error detected: Value null at 'iamRole' failed to satisfy constraint: Member must not be null")
    if role == "NoPassRole":
        raise Error("AccessDeniedException", "User: arn:aws:iam::123456789012:user/dev is not authorized to perform: iam:PassRole on resource: arn:aws:iam::123456789012:role/NoPassRole")
    limit = body.get("RegistrationLimit", 1)
    if not 1 <= limit <= 1000:
        raise Error("ValidationException", "RegistrationLimit must be between 1 and 1000")
    now = time.time()
    expires = body.get("ExpirationDate", now + 24 * 3600)
    if expires <= now or expires > now + MAX_LIFETIME + 60:
        raise Error("ValidationException", "ExpirationDate must be in the future and at most 30 days away")
    activation_id = str(uuid.uuid4())
    code = secrets.token_urlsafe(15)
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


OPERATIONS = {
    "CreateActivation": create_activation,
    "DescribeActivations": describe_activations,
    "DeleteActivation": delete_activation,
}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global throttle_left
        target = self.headers.get("X-Amz-Target", "")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with open(log_path, "a") as log:
            log.write(json.dumps({"target": target, "body": body}) + "\n")
        op = target.removeprefix("AmazonSSM.")
        try:
            if throttle_left > 0:
                throttle_left -= 1
                raise Error("ThrottlingException", "Rate exceeded")
            if op not in OPERATIONS:
                raise Error("UnknownOperationException", f"{op} is not implemented here")
            self.reply(200, OPERATIONS[op](body))
        except Error as e:
            self.reply(e.status, {"__type": e.kind, "message": e.message})

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


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(port_file, "w") as f:
    f.write(str(server.server_address[1]))
server.timeout = 1
deadline = time.time() + 300
while time.time() < deadline:
    server.handle_request()
