// Interop and conformance checks driven by a strict third-party relying party:
// panva's openid-client 6 (on oauth4webapi and jose), against a running Echo.
//
// Usage: node openid_client.mjs SETUP.json
// SETUP names the issuer, the gateway, a user and the clients the Rust harness
// registered (see crates/e2e/tests/interop.rs). Every check prints "ok: …"; the first
// failure throws and exits non-zero.

import * as client from 'openid-client';
import * as jose from 'jose';
import { readFileSync } from 'node:fs';

const setup = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const { issuer, gateway, username, password } = setup;
const insecure = { execute: [client.allowInsecureRequests] };

function assert(condition, message) {
  if (!condition) throw new Error(`assertion failed: ${message}`);
}

function ok(what) {
  console.log(`ok: ${what}`);
}

function unescapeHtml(text) {
  return text
    .replace(/&#x2[fF];/g, '/')
    .replace(/&#x27;|&#39;/g, "'")
    .replace(/&quot;/g, '"')
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&amp;/g, '&');
}

/** The action and hidden fields of the first form of an HTML page. */
function formOf(html) {
  const action = unescapeHtml((html.match(/<form[^>]*action="([^"]*)"/) || [])[1] || '');
  const fields = {};
  for (const match of html.matchAll(/<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"/g)) {
    fields[match[1]] = unescapeHtml(match[2]);
  }
  return { action, fields };
}

/** A browser at identity: keeps identity's cookie between requests. */
class Browser {
  constructor() {
    this.cookies = new Map();
  }
  header() {
    return [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; ');
  }
  remember(response) {
    for (const line of response.headers.getSetCookie()) {
      const [pair] = line.split(';');
      const [name, value] = pair.split('=');
      if (value === '') this.cookies.delete(name);
      else this.cookies.set(name, value);
    }
  }
  async get(url) {
    const response = await fetch(url, { redirect: 'manual', headers: { cookie: this.header() } });
    this.remember(response);
    return response;
  }
  async post(url, fields) {
    const response = await fetch(url, {
      method: 'POST',
      redirect: 'manual',
      headers: { cookie: this.header(), 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams(fields),
    });
    this.remember(response);
    return response;
  }
  /** Signs in on the login page `page` shows (a response of /authorize). */
  async logIn(page) {
    const html = await page.text();
    assert(html.includes('name="username"') && html.includes('name="password"'), `a login form: ${html.slice(0, 300)}`);
    const { action, fields } = formOf(html);
    return this.post(new URL(action, issuer), { ...fields, username, password });
  }
}

async function discover(clientId, secret, auth) {
  return client.discovery(new URL(issuer), clientId, secret, auth ?? (secret ? client.ClientSecretBasic(secret) : client.None()), insecure);
}

/** The whole code + PKCE flow; returns the tokens and the browser (with its SSO session). */
async function signIn(config, { redirectUri, scope, browser = new Browser(), extra = {} }) {
  const verifier = client.randomPKCECodeVerifier();
  const challenge = await client.calculatePKCECodeChallenge(verifier);
  const state = client.randomState();
  const nonce = client.randomNonce();
  const url = client.buildAuthorizationUrl(config, { redirect_uri: redirectUri, scope, code_challenge: challenge, code_challenge_method: 'S256', state, nonce, ...extra });
  let answer = await browser.get(url);
  if (answer.status === 200) answer = await browser.logIn(answer);
  assert(answer.status === 303 || answer.status === 302, `redirected back to the client, got ${answer.status}: ${(await answer.text()).slice(0, 300)}`);
  const callback = new URL(answer.headers.get('location'));
  const tokens = await client.authorizationCodeGrant(config, callback, { pkceCodeVerifier: verifier, expectedState: state, expectedNonce: nonce, idTokenExpected: scope.split(' ').includes('openid') });
  return { tokens, browser };
}

async function gatewayGet(path, token) {
  return fetch(`${gateway}${path}`, { headers: { authorization: `Bearer ${token}` } });
}

// 1. Code + PKCE for a client of each signing algorithm; ID token signatures checked
//    (non-repudiation), access tokens typed at+jwt, claims released by scope.
for (const [alg, clientId] of Object.entries(setup.public_clients)) {
  const config = await discover(clientId);
  client.enableNonRepudiationChecks(config);
  const { tokens } = await signIn(config, { redirectUri: setup.redirect_uri, scope: 'openid profile email offline_access echo' });
  const claims = tokens.claims();
  assert(claims.preferred_username === username && claims.email === setup.email && claims.email_verified === false, `profile and email claims: ${JSON.stringify(claims)}`);
  assert(jose.decodeProtectedHeader(tokens.id_token).alg === alg, 'the client\'s algorithm signs its ID token');
  const header = jose.decodeProtectedHeader(tokens.access_token);
  assert(header.typ === 'at+jwt' && header.alg === alg, `access token header ${JSON.stringify(header)}`);
  ok(`code + PKCE with ${alg}: ID token signature, iss, aud, nonce, exp and iat, and the authorization response's iss verified by openid-client; access token typed at+jwt`);
}

const config = await discover(setup.public_clients.RS256);
client.enableNonRepudiationChecks(config);

// 2. Scopes mean something: identity scopes give no API access; echo:read reads only.
{
  const { tokens } = await signIn(config, { redirectUri: setup.redirect_uri, scope: 'openid' });
  const claims = tokens.claims();
  assert(claims.preferred_username === undefined && claims.email === undefined, `openid alone releases no profile or email: ${JSON.stringify(claims)}`);
  const refused = await gatewayGet('/api/v1/documents', tokens.access_token);
  assert(refused.status === 403, `openid-only token at the API: ${refused.status}`);
  const challenge = refused.headers.get('www-authenticate') || '';
  assert(challenge.includes('error="insufficient_scope"') && challenge.includes('scope="echo"'), challenge);
  const userinfo = await client.fetchUserInfo(config, tokens.access_token, claims.sub);
  assert(userinfo.sub === claims.sub && userinfo.preferred_username === undefined, `userinfo by scope: ${JSON.stringify(userinfo)}`);
  const reader = (await signIn(config, { redirectUri: setup.redirect_uri, scope: 'openid echo:read' })).tokens;
  assert((await gatewayGet('/api/v1/documents', reader.access_token)).status === 200, 'echo:read reads');
  const write = await fetch(`${gateway}/api/v1/collections`, { method: 'POST', headers: { authorization: `Bearer ${reader.access_token}`, 'content-type': 'application/json' }, body: '{"name":"nope"}' });
  assert(write.status === 403, `echo:read cannot write: ${write.status}`);
  const full = (await signIn(config, { redirectUri: setup.redirect_uri, scope: 'openid profile echo frobnicate' })).tokens;
  assert(full.scope.split(' ').includes('echo') && !full.scope.includes('frobnicate'), `an unknown scope is ignored, not fatal: ${full.scope}`);
  assert((await gatewayGet('/api/v1/me', full.access_token)).status === 200, 'scope echo reaches the API');
  const garbage = await gatewayGet('/api/v1/me', 'not-a-token');
  assert(garbage.status === 401 && (garbage.headers.get('www-authenticate') || '').includes('error="invalid_token"'), 'invalid_token challenge');
  ok('scopes: openid alone gives identity, not API access (403 insufficient_scope); echo:read reads only; claims by scope; unknown scopes ignored; invalid_token challenge');
}

// 3. Refresh rotation, reuse detection, revocation, userinfo.
{
  const { tokens } = await signIn(config, { redirectUri: setup.redirect_uri, scope: 'openid offline_access echo' });
  const rotated = await client.refreshTokenGrant(config, tokens.refresh_token);
  assert(rotated.refresh_token && rotated.refresh_token !== tokens.refresh_token, 'rotated on use');
  let reused = false;
  try {
    await client.refreshTokenGrant(config, tokens.refresh_token);
  } catch (error) {
    reused = error.error === 'invalid_grant';
  }
  assert(reused, 'a spent refresh token is refused with invalid_grant');
  let familyRevoked = false;
  try {
    await client.refreshTokenGrant(config, rotated.refresh_token);
  } catch (error) {
    familyRevoked = error.error === 'invalid_grant';
  }
  assert(familyRevoked, 'reuse revokes the whole family');
  const fresh = (await signIn(config, { redirectUri: setup.redirect_uri, scope: 'openid echo' })).tokens;
  await client.tokenRevocation(config, fresh.access_token);
  let revoked = false;
  for (let i = 0; i < 50 && !revoked; i++) {
    revoked = (await gatewayGet('/api/v1/me', fresh.access_token)).status === 401;
    if (!revoked) await new Promise((r) => setTimeout(r, 50));
  }
  assert(revoked, 'a revoked access token is refused by the gateway');
  ok('refresh rotation, reuse revoking the family, RFC 7009 revocation honoured by the gateway');
}

// 4. RP-initiated logout: the hint must be an ID token of this client.
{
  const { tokens, browser } = await signIn(config, { redirectUri: setup.redirect_uri, scope: 'openid' });
  const other = await discover(setup.public_clients.ES256);
  const foreign = client.buildEndSessionUrl(other, { id_token_hint: tokens.id_token, post_logout_redirect_uri: setup.redirect_uri });
  assert((await browser.get(foreign)).status === 400, 'an id_token_hint of another client is refused');
  const logout = client.buildEndSessionUrl(config, { id_token_hint: tokens.id_token, post_logout_redirect_uri: setup.redirect_uri, state: 'bye' });
  const answer = await browser.get(logout);
  assert(answer.status === 303 && answer.headers.get('location').startsWith(setup.redirect_uri) && answer.headers.get('location').includes('state=bye'), `logout redirect: ${answer.status}`);
  const again = await browser.get(client.buildAuthorizationUrl(config, { redirect_uri: setup.redirect_uri, scope: 'openid', code_challenge: 'x'.repeat(43), code_challenge_method: 'S256' }));
  assert(again.status === 200, 'after logout the login form is shown again');
  ok('RP-initiated logout with id_token_hint (and a foreign client\'s hint refused)');
}

// 5. CORS for browser apps: discovery and JWKS for anyone, token/userinfo/revocation
//    for the origins of registered redirect URIs; preflights answered.
{
  const allowed = new URL(setup.redirect_uri).origin;
  const preflight = await fetch(`${issuer}/token`, { method: 'OPTIONS', headers: { origin: allowed, 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type' } });
  assert(preflight.status === 204 && preflight.headers.get('access-control-allow-origin') === allowed, `preflight ${preflight.status} ${preflight.headers.get('access-control-allow-origin')}`);
  assert((preflight.headers.get('access-control-allow-methods') || '').includes('POST'), 'methods');
  const stranger = await fetch(`${issuer}/token`, { method: 'OPTIONS', headers: { origin: 'https://evil.example', 'access-control-request-method': 'POST' } });
  assert(stranger.headers.get('access-control-allow-origin') === null, 'an unregistered origin gets no CORS grant');
  const discovery = await fetch(`${issuer}/.well-known/openid-configuration`, { headers: { origin: 'https://anyone.example' } });
  assert(discovery.headers.get('access-control-allow-origin') === '*', 'discovery is public');
  const jwks = await fetch(`${issuer}/jwks`, { headers: { origin: 'https://anyone.example' } });
  assert(jwks.headers.get('access-control-allow-origin') === '*', 'JWKS is public');
  const userinfo = await fetch(`${issuer}/userinfo`, { method: 'OPTIONS', headers: { origin: allowed, 'access-control-request-method': 'GET', 'access-control-request-headers': 'authorization' } });
  assert(userinfo.status === 204 && userinfo.headers.get('access-control-allow-origin') === allowed, 'userinfo preflight');
  ok('CORS: discovery and JWKS public; token, userinfo and revocation for registered origins only');
}

// 6. The authorization endpoint as Core and RFC 9207 want it.
{
  const meta = config.serverMetadata();
  assert(meta.request_parameter_supported === false && meta.request_uri_parameter_supported === false, 'request objects advertised unsupported');
  assert(meta.authorization_response_iss_parameter_supported === true, 'iss in authorization responses advertised');
  const browser = new Browser();
  const base = { client_id: setup.public_clients.RS256, redirect_uri: setup.redirect_uri, response_type: 'code', scope: 'openid', code_challenge: 'y'.repeat(43), code_challenge_method: 'S256', state: 'st' };
  const posted = await browser.post(`${issuer}/authorize`, base);
  assert(posted.status === 200 && (await posted.text()).includes('name="password"'), `POST /authorize shows the login page: ${posted.status}`);
  const withRequest = await browser.get(`${issuer}/authorize?${new URLSearchParams({ ...base, request: 'eyJhbGciOiJub25lIn0.e30.' })}`);
  const location = new URL(withRequest.headers.get('location'));
  assert(location.searchParams.get('error') === 'request_not_supported' && location.searchParams.get('iss') === issuer && location.searchParams.get('state') === 'st', `request= refused: ${location}`);
  const withRequestUri = new URL((await browser.get(`${issuer}/authorize?${new URLSearchParams({ ...base, request_uri: 'https://x.example/r' })}`)).headers.get('location'));
  assert(withRequestUri.searchParams.get('error') === 'request_uri_not_supported', 'request_uri refused');
  const mixed = new URL((await browser.get(`${issuer}/authorize?${new URLSearchParams({ ...base, prompt: 'none login' })}`)).headers.get('location'));
  assert(mixed.searchParams.get('error') === 'invalid_request' && mixed.searchParams.get('iss') === issuer, `prompt=none login: ${mixed}`);
  ok('POST /authorize; request and request_uri refused as unsupported; iss on error redirects; prompt=none with login refused');
}

// 7. RFC 8252: a native app's loopback redirect on a port of its own.
{
  const native = await discover(setup.loopback_client);
  const port = 40000 + Math.floor(Math.random() * 20000);
  const { tokens } = await signIn(native, { redirectUri: `http://127.0.0.1:${port}/callback`, scope: 'openid' });
  assert(tokens.claims().aud === setup.loopback_client, 'loopback redirect on any port');
  ok(`RFC 8252 loopback redirect on port ${port}`);
}

// 8. The token endpoint for machines.
{
  const machine = await discover(setup.confidential.client_id, setup.confidential.secret);
  const grant = await client.clientCredentialsGrant(machine, { scope: 'echo' });
  const claims = jose.decodeJwt(grant.access_token);
  assert(claims.aud === 'echo-api' && claims.scope === 'echo' && claims.sub === setup.confidential.client_id, `client credentials: ${JSON.stringify(claims)}`);
  const noGrant = await fetch(`${issuer}/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded', authorization: `Basic ${Buffer.from(`${setup.confidential.client_id}:${setup.confidential.secret}`).toString('base64')}` },
    body: 'scope=echo',
  });
  assert(noGrant.status === 400 && (await noGrant.json()).error === 'invalid_request', 'a missing grant_type is invalid_request');
  ok('client_credentials for a registered confidential client without an audience parameter; missing grant_type is invalid_request');
}

// 9. Consent: asked once, remembered, asked again on prompt=consent, deniable, revocable.
{
  const consenting = await discover(setup.consent_client);
  const browser = new Browser();
  const verifier = client.randomPKCECodeVerifier();
  const challenge = await client.calculatePKCECodeChallenge(verifier);
  const state = client.randomState();
  const url = client.buildAuthorizationUrl(consenting, { redirect_uri: setup.redirect_uri, scope: 'openid profile echo', code_challenge: challenge, code_challenge_method: 'S256', state });
  const asked = await browser.logIn(await browser.get(url));
  const page = await asked.text();
  assert(asked.status === 200 && page.includes(setup.consent_client) && page.includes('echo') && page.includes('Allow'), `the consent page names the client and scopes: ${page.slice(0, 400)}`);
  const { action, fields } = formOf(page);
  const allowed = await browser.post(new URL(action, issuer), { ...fields, decision: 'allow' });
  assert(allowed.status === 303, `allow continues: ${allowed.status}`);
  const tokens = await client.authorizationCodeGrant(consenting, new URL(allowed.headers.get('location')), { pkceCodeVerifier: verifier, expectedState: state, idTokenExpected: true });
  const again = await browser.get(client.buildAuthorizationUrl(consenting, { redirect_uri: setup.redirect_uri, scope: 'openid profile', code_challenge: challenge, code_challenge_method: 'S256', state }));
  assert(again.status === 303, `remembered: no second question (${again.status})`);
  const forced = await browser.get(client.buildAuthorizationUrl(consenting, { redirect_uri: setup.redirect_uri, scope: 'openid', code_challenge: challenge, code_challenge_method: 'S256', state, prompt: 'consent' }));
  assert(forced.status === 200 && (await forced.text()).includes('Allow'), 'prompt=consent asks again');
  const second = await browser.get(client.buildAuthorizationUrl(consenting, { redirect_uri: setup.redirect_uri, scope: 'openid', code_challenge: challenge, code_challenge_method: 'S256', state, prompt: 'consent' }));
  const denyForm = formOf(await second.text());
  const denied = await browser.post(new URL(denyForm.action, issuer), { ...denyForm.fields, decision: 'deny' });
  const deniedAt = new URL(denied.headers.get('location'));
  assert(deniedAt.searchParams.get('error') === 'access_denied' && deniedAt.searchParams.get('iss') === issuer, `deny: ${deniedAt}`);
  assert((await gatewayGet('/api/v1/me', tokens.access_token)).status === 200, 'the allowed token works');
  const withdrawn = await fetch(`${gateway}/api/v1/me/consents/${encodeURIComponent(setup.consent_client)}`, { method: 'DELETE', headers: { authorization: `Bearer ${tokens.access_token}` } });
  assert(withdrawn.status === 204, `withdrawn: ${withdrawn.status}`);
  let refused = false;
  for (let i = 0; i < 50 && !refused; i++) {
    refused = (await gatewayGet('/api/v1/me', tokens.access_token)).status === 401;
    if (!refused) await new Promise((r) => setTimeout(r, 50));
  }
  assert(refused, 'a withdrawn consent ends the client\'s tokens');
  const afterwards = await browser.get(client.buildAuthorizationUrl(consenting, { redirect_uri: setup.redirect_uri, scope: 'openid', code_challenge: challenge, code_challenge_method: 'S256', state }));
  assert(afterwards.status === 200 && (await afterwards.text()).includes('Allow'), 'asked again after withdrawing');
  ok('consent: asked once and remembered, prompt=consent asks again, deny gives access_denied, withdrawing ends the client\'s tokens');
}

console.log('all openid-client checks passed');
