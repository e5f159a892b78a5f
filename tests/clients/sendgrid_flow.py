"""SendGrid's official Python library (pip install sendgrid) against keyward's
REST key API, unchanged but for the host: the key lifecycle and its error
cases. Prints the keys it leaves alive or revoked as JSON for tests/rest.rs,
which checks them through Authorize.

Environment: KEYWARD_URL (http://127.0.0.1:PORT), KEYWARD_ADMIN (the admin
token), KEYWARD_LIMIT (the server's --max-keys-per-account).
"""
import json
import os
import sys

import sendgrid
from python_http_client import exceptions

URL = os.environ["KEYWARD_URL"]
ADMIN = os.environ["KEYWARD_ADMIN"]
LIMIT = int(os.environ["KEYWARD_LIMIT"])
MANAGER_SCOPES = [
    "api_keys.create", "api_keys.read", "api_keys.update", "api_keys.delete",
    "mail.send", "alerts.read",
]


def client(key, on_behalf_of=None):
    return sendgrid.SendGridAPIClient(api_key=key, host=URL, impersonate_subuser=on_behalf_of).client


def body(response):
    return json.loads(response.body) if response.body else None


def refused(call, error, field=None, needle=None):
    """The call must fail with `error` in SendGrid's error format."""
    try:
        call()
    except error as failure:
        errors = json.loads(failure.body)["errors"]
        assert len(errors) == 1 and "message" in errors[0] and "field" in errors[0], errors
        if field is not None:
            assert errors[0]["field"] == field, errors
        if needle is not None:
            assert needle in errors[0]["message"], errors
        return errors[0]
    raise AssertionError(f"expected {error.__name__}")


# The operator (admin token) acts for an account with on-behalf-of.
admin = client(ADMIN, on_behalf_of="acme")
created = admin.api_keys.post(request_body={"name": "manager", "scopes": MANAGER_SCOPES})
assert created.status_code == 201, created.status_code
manager = body(created)
assert set(manager) >= {"api_key", "api_key_id", "name", "scopes"}, manager
assert manager["name"] == "manager" and sorted(manager["scopes"]) == sorted(MANAGER_SCOPES), manager
assert len(manager["api_key"]) == 69 and manager["api_key"].startswith("SG."), "a SendGrid-shaped key"
# The admin token without on-behalf-of names no account.
refused(lambda: client(ADMIN).api_keys.post(request_body={"name": "x"}),
        exceptions.BadRequestsError, field="on-behalf-of")

# The key itself, in its own account, with its api_keys.* scopes.
sg = client(manager["api_key"])
child = body(sg.api_keys.post(request_body={"name": "mailer", "scopes": ["mail.send"]}))
assert child["scopes"] == ["mail.send"], child
got = body(sg.api_keys._(child["api_key_id"]).get())


def sendgrids(key, fields=("name", "api_key_id", "scopes")):
    """SendGrid's fields of a key (keyward adds lifecycle fields, which clients ignore)."""
    return {f: key[f] for f in fields}


assert len(got["result"]) == 1, got
assert sendgrids(got["result"][0]) == {"name": "mailer", "api_key_id": child["api_key_id"],
                                       "scopes": ["mail.send"]}, got
assert got["result"][0]["enabled"] is True and got["result"][0]["expires_at"] is None, got
assert got["result"][0]["kind"] == "restricted_access" and got["result"][0]["account"] == "acme", got
listed = body(sg.api_keys.get(query_params={"limit": 10}))
assert {"name": "mailer", "api_key_id": child["api_key_id"]} in [sendgrids(k, ("name", "api_key_id"))
                                                                 for k in listed["result"]], listed
assert all("scopes" not in k for k in listed["result"]), "a list shows no scopes"
put = body(sg.api_keys._(child["api_key_id"]).put(request_body={"name": "alerts", "scopes": ["alerts.read"]}))
assert sendgrids(put) == {"api_key_id": child["api_key_id"], "name": "alerts", "scopes": ["alerts.read"]}, put
assert put["enabled"] is True and put["expires_at"] is None, put
patched = body(sg.api_keys._(child["api_key_id"]).patch(request_body={"name": "alerts reader"}))
assert patched == {"api_key_id": child["api_key_id"], "name": "alerts reader"}, patched
own = body(sg.scopes.get())
assert sorted(own["scopes"]) == sorted(MANAGER_SCOPES), own
full = body(admin.api_keys.post(request_body={"name": "full"}))
assert len(full["scopes"]) > 150 and "billing.read" not in full["scopes"], "no scopes: Full Access"

# Errors, each with SendGrid's status and format, and nothing changed.
refused(lambda: sg.api_keys.post(request_body={"name": "x", "scopes": ["no.such.scope"]}),
        exceptions.BadRequestsError, field="scopes")
refused(lambda: admin.api_keys.post(request_body={"name": "x", "scopes": ["billing.read", "mail.send"]}),
        exceptions.BadRequestsError, field="scopes", needle="Billing")
refused(lambda: sg.api_keys.post(request_body={"name": "x", "scopes": ["templates.read"]}),
        exceptions.ForbiddenError, needle="templates.read")
refused(lambda: sg.api_keys.post(request_body={"scopes": ["mail.send"]}),
        exceptions.BadRequestsError, field="name")
refused(lambda: sg.api_keys._(child["api_key_id"]).put(request_body={"name": "no scopes"}),
        exceptions.BadRequestsError, field="scopes")
refused(lambda: sg.api_keys._("AAAAAAAAAAAAAAAAAAAAAA").get(), exceptions.NotFoundError)
refused(lambda: sg.api_keys._("not-an-id").get(), exceptions.BadRequestsError, field="api_key_id")
refused(lambda: client("SG.AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").scopes.get(),
        exceptions.UnauthorizedError)
# Another account's key is not found, never forbidden.
other = body(client(ADMIN, on_behalf_of="other").api_keys.post(
    request_body={"name": "elsewhere", "scopes": ["mail.send"]}))
refused(lambda: sg.api_keys._(other["api_key_id"]).get(), exceptions.NotFoundError)
refused(lambda: sg.api_keys._(other["api_key_id"]).delete(), exceptions.NotFoundError)
# A key cannot name another account.
refused(lambda: client(manager["api_key"], on_behalf_of="other").api_keys.get(), exceptions.ForbiddenError)
# The per-account limit answers 403, as SendGrid does.
count = len(body(sg.api_keys.get(query_params={"limit": 500}))["result"])
for n in range(LIMIT - count):
    sg.api_keys.post(request_body={"name": f"filler {n}", "scopes": ["alerts.read"]})
refused(lambda: sg.api_keys.post(request_body={"name": "one too many", "scopes": ["alerts.read"]}),
        exceptions.ForbiddenError, needle="maximum")

# Revocation: 204, then gone.
revoked = sg.api_keys._(child["api_key_id"]).delete()
assert revoked.status_code == 204 and not revoked.body, revoked.status_code
refused(lambda: sg.api_keys._(child["api_key_id"]).get(), exceptions.NotFoundError)

json.dump({
    "allowed_mail_send": [manager["api_key"], full["api_key"], other["api_key"]],
    "revoked": [child["api_key"]],
}, sys.stdout)
