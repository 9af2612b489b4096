"""A stand-in for `piprov broker`'s card-facing API, for testing the card's
request code (firstboot/register.sh): HTTPS on loopback with a test CA, Bearer
token check, and the first N requests to /v1/activations answered 503 as a broker
that is down would be. Each request is logged as a JSON line.

    broker_stub.py CERT KEY TOKEN FAIL_FIRST ACTIVATION_ID CODE REGION LOG PORT_FILE
"""
import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

cert, key, token, fail_first, act_id, code, region, log_path, port_file = sys.argv[1:10]
fail_left = int(fail_first)


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global fail_left
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length).decode()
        with open(log_path, "a") as log:
            log.write(json.dumps({"path": self.path, "auth": self.headers.get("Authorization"), "body": body}) + "\n")
        if self.headers.get("Authorization") != f"Bearer {token}":
            return self.reply(401, {"error": "bad token"})
        if self.path == "/v1/activations":
            if fail_left > 0:
                fail_left -= 1
                return self.reply(503, {"error": "down"})
            return self.reply(200, {"activation_id": act_id, "activation_code": code, "region": region})
        if self.path == "/v1/registrations":
            return self.reply(200, {"ok": True})
        self.reply(404, {"error": "no such path"})

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
with open(port_file, "w") as f:
    f.write(str(server.server_address[1]))
# Bounded: the test kills it, and it stops by itself after two minutes.
server.timeout = 1
import time
deadline = time.time() + 120
while time.time() < deadline:
    server.handle_request()
