"""Load for `piprov broker`: COUNT Pis enrolling at once from CONCURRENCY clients,
each doing what a card does: ask the broker for an activation, register it with
SSM (the local endpoint, as the agent would), report the registration to the
broker. A request that finds the broker down (connection refused or reset, 5xx)
is retried, as the card's register step retries; nothing else is.

    broker_load.py BROKER_URL CA TOKEN SSM_URL COUNT CONCURRENCY PROGRESS_FILE RESULT_FILE [--device-keys]

With --device-keys every Pi has its own P-256 device key and signs its
activation request as a card with `activation.device_key` does: a fresh
challenge from the broker, then `piprov-enrollment-v1\n` + the body, signed.

Writes the number of finished enrollments to PROGRESS_FILE as it goes, and a
JSON summary to RESULT_FILE: per serial the activation and node it ended with,
retries, throughput and the latency of successful activation requests.
"""
import http.client
import json
import ssl
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

broker_url, ca, token, ssm_url = sys.argv[1:5]
count, concurrency = int(sys.argv[5]), int(sys.argv[6])
progress_file, result_file = sys.argv[7], sys.argv[8]
device_keys = sys.argv[9:] == ["--device-keys"]
if device_keys:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
broker = urllib.parse.urlsplit(broker_url)
ssm = urllib.parse.urlsplit(ssm_url)
context = ssl.create_default_context(cafile=ca)
lock = threading.Lock()
state = {"done": 0, "retries": 0, "latencies": [], "challenge_latencies": [], "serials": {}, "failed": []}
DEADLINE = time.time() + 300


def post(https, host, port, path, headers, body):
    conn = (http.client.HTTPSConnection(host, port, context=context, timeout=30)
            if https else http.client.HTTPConnection(host, port, timeout=30))
    try:
        conn.request("POST", path, body=body if isinstance(body, bytes) else json.dumps(body), headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def broker_post(path, body, extra_headers=None):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **(extra_headers or {})}
    while time.time() < DEADLINE:
        started = time.perf_counter()
        try:
            status, reply = post(True, broker.hostname, broker.port, path, headers, body)
        except (OSError, http.client.HTTPException):
            status, reply = None, None
        if status is not None and status < 500:
            return status, reply, time.perf_counter() - started
        with lock:
            state["retries"] += 1
        time.sleep(0.1)
    raise RuntimeError("deadline passed")


def register_with_ssm(activation):
    """As `amazon-ssm-agent -register` does; a network error is retried, as the
    card's register step retries the agent."""
    while time.time() < DEADLINE:
        try:
            status, reply = post(False, ssm.hostname, ssm.port, "/", {
                "X-Amz-Target": "AmazonSSM.RegisterManagedInstance",
                "Content-Type": "application/x-amz-json-1.1",
            }, {"ActivationId": activation["activation_id"], "ActivationCode": activation["activation_code"],
                "PublicKey": "key", "PublicKeyType": "Rsa", "Fingerprint": "fp"})
            return reply.get("InstanceId") if status == 200 else None
        except (OSError, http.client.HTTPException):
            with lock:
                state["retries"] += 1
            time.sleep(0.1)
    raise RuntimeError("deadline passed")


def ask_activation(serial, n, key):
    fields = {"serial": serial, "hostname": f"pi-{n}", "machine_id": "",
              "image_sha256": "", "previous_instance_id": ""}
    if key is None:
        return broker_post("/v1/activations", fields)
    status, reply, seconds = broker_post("/v1/challenges", {})
    if status != 200:
        raise RuntimeError(f"challenge: {status} {reply}")
    with lock:
        state["challenge_latencies"].append(seconds)
    body = json.dumps({"challenge": reply["challenge"], **fields}).encode()
    signature = key.sign(b"piprov-enrollment-v1\n" + body, ec.ECDSA(hashes.SHA256()))
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return broker_post("/v1/activations", body, {
        "X-Piprov-Device-Key": public.hex(), "X-Piprov-Device-Signature": signature.hex()})


def enrol(n):
    serial = f"{0x1000000000000000 + n:016x}"
    key = ec.generate_private_key(ec.SECP256R1()) if device_keys else None
    try:
        for _ in range(5):
            status, activation, seconds = ask_activation(serial, n, key)
            if status == 401 and key is not None and "challenge" in activation.get("error", ""):
                # The challenge was spent by a request the broker's kill cut short.
                with lock:
                    state["retries"] += 1
                continue
            if status != 200:
                raise RuntimeError(f"activation: {status} {activation}")
            with lock:
                state["latencies"].append(seconds)
            instance = register_with_ssm(activation)
            if instance:
                break
            with lock:
                state["retries"] += 1
        else:
            raise RuntimeError("SSM refused every activation")
        status, reply, _ = broker_post("/v1/registrations", {
            "serial": serial, "instance_id": instance, "previous_instance_id": ""})
        if status != 200:
            raise RuntimeError(f"registration: {status} {reply}")
        with lock:
            state["serials"][serial] = {"activation_id": activation["activation_id"], "instance_id": instance}
    except Exception as e:  # noqa: BLE001 - every failure is reported, none hidden
        with lock:
            state["failed"].append({"serial": serial, "error": str(e)})
    with lock:
        state["done"] += 1
        if state["done"] % 20 == 0 or state["done"] == count:
            with open(progress_file, "w") as f:
                f.write(str(state["done"]))


started = time.perf_counter()
with ThreadPoolExecutor(max_workers=concurrency) as pool:
    list(pool.map(enrol, range(count)))
elapsed = time.perf_counter() - started
latencies = sorted(state["latencies"])
challenges = sorted(state["challenge_latencies"])
pick = lambda q, xs=latencies: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else None
with open(result_file, "w") as f:
    json.dump({
        "enrolled": len(state["serials"]), "failed": state["failed"], "retries": state["retries"],
        "elapsed_s": elapsed, "enrollments_per_s": len(state["serials"]) / elapsed,
        "activation_requests": len(latencies),
        "activation_p50_ms": pick(0.50), "activation_p99_ms": pick(0.99),
        "device_keys": device_keys,
        "challenge_p50_ms": pick(0.50, challenges), "challenge_p99_ms": pick(0.99, challenges),
        "serials": state["serials"],
    }, f)
