"""Interop check: a third-party OIDC client (Authlib) runs authorization code + PKCE
against a running Echo, submits the login form like a browser would, and validates
the ID token with its own JOSE code against the published JWKS.

Usage: python oidc_authlib.py ISSUER CLIENT_ID REDIRECT_URI USERNAME PASSWORD
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
    issuer, client_id, redirect_uri, username, password = sys.argv[1:6]
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
    print(f"ok: code + PKCE via Authlib, ID token for {claims['sub']} validated against the JWKS (kid {jwt.decode(token['id_token'], jwks).header['kid']})")
    userinfo = requests.get(discovery["userinfo_endpoint"], headers={"Authorization": f"Bearer {token['access_token']}"}, timeout=10).json()
    assert userinfo["sub"] == claims["sub"], userinfo
    refreshed = client.refresh_token(discovery["token_endpoint"], refresh_token=token["refresh_token"])
    assert refreshed["access_token"] != token["access_token"]
    print("ok: userinfo and refresh-token rotation")


if __name__ == "__main__":
    main()
