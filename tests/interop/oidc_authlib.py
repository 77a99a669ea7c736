"""Interop check: a third-party OIDC client (Authlib) runs authorization code + PKCE
against a running Echo, submits the login form like a browser would, and validates
the ID token with its own JOSE code against the published JWKS.

Then: refresh rotation, revocation (RFC 7009), introspection (RFC 7662) by a
confidential client, and RP-initiated logout ending the identity session.

Usage: python oidc_authlib.py ISSUER CLIENT_ID REDIRECT_URI USERNAME PASSWORD CONF_ID CONF_SECRET
Exit 0 on success; prints what it checked.
"""
import html.parser
import sys
import urllib.parse

import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebKey, jwt
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.common.security import generate_token


class FormParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.action = None
        self.fields = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.action = attrs.get("action")
        if tag == "input" and attrs.get("name"):
            self.fields[attrs["name"]] = attrs.get("value", "")


def main():
    issuer, client_id, redirect_uri, username, password, conf_id, conf_secret = sys.argv[1:8]
    discovery = requests.get(f"{issuer}/.well-known/openid-configuration", timeout=10).json()
    assert discovery["issuer"] == issuer, discovery
    verifier = generate_token(64)
    nonce = generate_token(20)
    client = OAuth2Session(client_id, redirect_uri=redirect_uri, scope="openid profile offline_access",
                           code_challenge_method="S256", token_endpoint_auth_method="none")
    url, state = client.create_authorization_url(discovery["authorization_endpoint"], nonce=nonce, code_verifier=verifier)
    browser = requests.Session()
    page = browser.get(url, timeout=10)
    assert page.status_code == 200, page.text
    form = FormParser()
    form.feed(page.text)
    fields = dict(form.fields)
    fields["username"] = username
    fields["password"] = password
    answer = browser.post(urllib.parse.urljoin(page.url, form.action), data=fields, allow_redirects=False, timeout=10)
    assert answer.status_code in (302, 303), (answer.status_code, answer.text[:500])
    callback = answer.headers["location"]
    assert callback.startswith(redirect_uri), callback
    token = client.fetch_token(discovery["token_endpoint"], authorization_response=callback, code_verifier=verifier)
    jwks = JsonWebKey.import_key_set(requests.get(discovery["jwks_uri"], timeout=10).json())
    claims = jwt.decode(token["id_token"], jwks, claims_options={
        "iss": {"essential": True, "value": issuer},
        "aud": {"essential": True, "value": client_id},
        "nonce": {"essential": True, "value": nonce},
    })
    claims.validate()
    assert claims["preferred_username"] == username, claims
    header = jwt.decode(token["id_token"], jwks).header
    print(f"ok: code + PKCE via Authlib, ID token for {claims['sub']} validated against the JWKS (alg {header['alg']}, kid {header['kid']})")
    userinfo = requests.get(discovery["userinfo_endpoint"], headers={"Authorization": f"Bearer {token['access_token']}"}, timeout=10).json()
    assert userinfo["sub"] == claims["sub"], userinfo
    refreshed = client.refresh_token(discovery["token_endpoint"], refresh_token=token["refresh_token"])
    assert refreshed["access_token"] != token["access_token"]
    print("ok: userinfo and refresh-token rotation")

    confidential = OAuth2Session(conf_id, conf_secret, token_endpoint_auth_method="client_secret_basic")
    seen = confidential.introspect_token(discovery["introspection_endpoint"], token=refreshed["access_token"]).json()
    assert seen["active"] is True and seen["sub"] == claims["sub"], seen
    client.revoke_token(discovery["revocation_endpoint"], token=refreshed["access_token"], token_type_hint="access_token")
    seen = confidential.introspect_token(discovery["introspection_endpoint"], token=refreshed["access_token"]).json()
    assert seen["active"] is False, seen
    client.revoke_token(discovery["revocation_endpoint"], token=refreshed["refresh_token"], token_type_hint="refresh_token")
    try:
        client.refresh_token(discovery["token_endpoint"], refresh_token=refreshed["refresh_token"])
        raise AssertionError("a revoked refresh token still worked")
    except Exception as error:  # authlib raises OAuthError
        assert "invalid_grant" in str(error), error
    public_introspection = requests.post(discovery["introspection_endpoint"], data={"token": token["access_token"], "client_id": client_id}, timeout=10)
    assert public_introspection.status_code in (400, 401), public_introspection.text
    print("ok: introspection, revocation of access and refresh tokens")

    # Without an id_token_hint, logout asks the person instead of acting on a bare link.
    asked = browser.get(discovery["end_session_endpoint"], params={"client_id": client_id, "post_logout_redirect_uri": redirect_uri, "state": "bye"}, allow_redirects=False, timeout=10)
    assert asked.status_code == 200 and "logout_token" in asked.text, (asked.status_code, asked.text[:300])
    hostile = browser.get(discovery["end_session_endpoint"], params={"client_id": client_id, "post_logout_redirect_uri": "https://evil.example/"}, allow_redirects=False, timeout=10)
    assert hostile.status_code == 400 and "location" not in hostile.headers, "unregistered post-logout URIs are never followed"
    logout = browser.get(discovery["end_session_endpoint"], params={"id_token_hint": token["id_token"], "post_logout_redirect_uri": redirect_uri, "state": "bye"}, allow_redirects=False, timeout=10)
    assert logout.status_code in (302, 303) and logout.headers["location"].startswith(redirect_uri), (logout.status_code, logout.headers)
    assert "state=bye" in logout.headers["location"], logout.headers["location"]
    again = browser.get(url, allow_redirects=False, timeout=10)
    assert again.status_code == 200 and 'name="password"' in again.text, "after logout the login form is shown again"
    print("ok: RP-initiated logout")


if __name__ == "__main__":
    main()
