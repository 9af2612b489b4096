"""IAM for the tests' local endpoint (ssm_stub.py serves it beside SSM): the
Query protocol as IAM speaks it (form-encoded `POST /` with Action and
Version=2010-05-08, XML answers in the 2010-05-08 namespace, errors as
<ErrorResponse> with IAM's codes and statuses). Roles and their attached
policies are kept in memory. The calls of `piprov setup role`: GetRole,
CreateRole, ListAttachedRolePolicies, AttachRolePolicy, UpdateAssumeRolePolicy.

Trust policies are returned URL-encoded, as IAM returns them. The access key id
AKIADENIEDDENIED0000 is answered AccessDenied, as an identity without IAM
permissions is.
"""
import json
import urllib.parse
import uuid
from xml.sax.saxutils import escape

NS = "https://iam.amazonaws.com/doc/2010-05-08/"
ACCOUNT = "123456789012"
DENIED_KEY = "AKIADENIEDDENIED0000"
# AWS managed policies the tests attach; customer ones are any in the account.
MANAGED = {
    "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore",
    "arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy",
    "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess",
}
roles = {}


class IamError(Exception):
    def __init__(self, code, message, status):
        self.code, self.message, self.status = code, message, status


def role_xml(role):
    return (
        f"<Role><Path>/</Path><RoleName>{escape(role['name'])}</RoleName>"
        f"<RoleId>{role['id']}</RoleId><Arn>{escape(role['arn'])}</Arn>"
        f"<CreateDate>{role['created']}</CreateDate>"
        f"<AssumeRolePolicyDocument>{escape(urllib.parse.quote(role['trust'], safe=''))}"
        f"</AssumeRolePolicyDocument><MaxSessionDuration>3600</MaxSessionDuration></Role>"
    )


def find(name):
    if name not in roles:
        raise IamError("NoSuchEntity", f"The role with name {name} cannot be found.", 404)
    return roles[name]


def policy_document(text):
    try:
        doc = json.loads(text)
    except ValueError:
        raise IamError("MalformedPolicyDocument", "This policy contains invalid Json", 400)
    if not isinstance(doc, dict) or "Statement" not in doc:
        raise IamError("MalformedPolicyDocument", "Syntax errors in policy.", 400)
    return text


def get_role(form):
    return role_xml(find(form["RoleName"]))


def create_role(form):
    name = form.get("RoleName", "")
    if not name or len(name) > 64:
        raise IamError("ValidationError", "1 validation error detected: Value at 'roleName' failed to satisfy constraint", 400)
    if name in roles:
        raise IamError("EntityAlreadyExists", f"Role with name {name} already exists.", 409)
    roles[name] = {
        "name": name,
        "id": "AROA" + uuid.uuid4().hex[:17].upper(),
        "arn": f"arn:aws:iam::{ACCOUNT}:role/{name}",
        "created": "2026-12-01T00:00:00Z",
        "trust": policy_document(form.get("AssumeRolePolicyDocument", "")),
        "attached": [],
    }
    return role_xml(roles[name])


def list_attached(form):
    role = find(form["RoleName"])
    members = "".join(
        f"<member><PolicyName>{escape(arn.rsplit('/', 1)[-1])}</PolicyName>"
        f"<PolicyArn>{escape(arn)}</PolicyArn></member>"
        for arn in role["attached"]
    )
    return f"<IsTruncated>false</IsTruncated><AttachedPolicies>{members}</AttachedPolicies>"


def attach(form):
    role = find(form["RoleName"])
    arn = form.get("PolicyArn", "")
    if arn not in MANAGED and not arn.startswith(f"arn:aws:iam::{ACCOUNT}:policy/"):
        raise IamError("NoSuchEntity", f"Policy {arn} does not exist or is not attachable.", 404)
    if arn not in role["attached"]:
        role["attached"].append(arn)
    return None


def update_trust(form):
    role = find(form["RoleName"])
    role["trust"] = policy_document(form.get("PolicyDocument", ""))
    return None


ACTIONS = {
    "GetRole": get_role,
    "CreateRole": create_role,
    "ListAttachedRolePolicies": list_attached,
    "AttachRolePolicy": attach,
    "UpdateAssumeRolePolicy": update_trust,
}


def handle(body, authorization):
    """(status, XML) for one Query request; `body` is the form, as bytes."""
    form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode(), keep_blank_values=True).items()}
    action = form.get("Action", "")
    request_id = str(uuid.uuid4())
    try:
        if f"Credential={DENIED_KEY}/" in authorization:
            raise IamError(
                "AccessDenied",
                f"User: arn:aws:iam::{ACCOUNT}:user/dev is not authorized to perform: iam:{action} "
                "because no identity-based policy allows the iam:" + action + " action",
                403,
            )
        if form.get("Version") != "2010-05-08":
            raise IamError("InvalidAction", "Could not find operation for version", 400)
        if action not in ACTIONS:
            raise IamError("InvalidAction", f"Could not find operation {action}", 400)
        result = ACTIONS[action](form)
    except IamError as e:
        return e.status, (
            f'<ErrorResponse xmlns="{NS}"><Error><Type>Sender</Type><Code>{e.code}</Code>'
            f"<Message>{escape(e.message)}</Message></Error><RequestId>{request_id}</RequestId>"
            "</ErrorResponse>"
        ), form
    inner = f"<{action}Result>{result}</{action}Result>" if result is not None else ""
    return 200, (
        f'<{action}Response xmlns="{NS}">{inner}'
        f"<ResponseMetadata><RequestId>{request_id}</RequestId></ResponseMetadata>"
        f"</{action}Response>"
    ), form
