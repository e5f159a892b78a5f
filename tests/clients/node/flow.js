// SendGrid's official Node client (@sendgrid/client) against keyward's REST
// key API, unchanged but for the base URL: the same lifecycle and errors as
// sendgrid_flow.py, so two independent implementations agree. Prints the
// keys it leaves alive or revoked as JSON for tests/rest.rs.
'use strict';
const assert = require('node:assert/strict');
const { Client } = require('@sendgrid/client');

const URL = process.env.KEYWARD_URL;
const ADMIN = process.env.KEYWARD_ADMIN;

function client(key, onBehalfOf) {
  const c = new Client();
  c.setApiKey(key);
  c.setDefaultRequest('baseUrl', URL);
  if (onBehalfOf) c.setDefaultHeader('on-behalf-of', onBehalfOf);
  return c;
}

async function call(c, method, url, body) {
  const [response, json] = await c.request({ method, url, body });
  return { status: response.statusCode, body: json };
}

async function refused(promise, status, field) {
  try {
    await promise;
  } catch (error) {
    assert.equal(error.code, status, JSON.stringify(error.response && error.response.body));
    const errors = error.response.body.errors;
    assert.equal(errors.length, 1);
    assert.ok('message' in errors[0] && 'field' in errors[0]);
    if (field !== undefined) assert.equal(errors[0].field, field);
    return;
  }
  assert.fail(`expected HTTP ${status}`);
}

(async () => {
  const admin = client(ADMIN, 'node-acme');
  const scopes = ['api_keys.create', 'api_keys.read', 'api_keys.update', 'api_keys.delete', 'mail.send'];
  const created = await call(admin, 'POST', '/v3/api_keys', { name: 'node manager', scopes });
  assert.equal(created.status, 201);
  const manager = created.body;
  assert.equal(manager.api_key.length, 69);
  assert.deepEqual([...manager.scopes].sort(), [...scopes].sort());

  const sg = client(manager.api_key);
  const child = (await call(sg, 'POST', '/v3/api_keys', { name: 'node mailer', scopes: ['mail.send'] })).body;
  const got = await call(sg, 'GET', `/v3/api_keys/${child.api_key_id}`);
  // SendGrid's fields of a key, and two of keyward's lifecycle fields
  // (clients ignore the ones they do not know).
  const sendgrids = (key) => ({ name: key.name, api_key_id: key.api_key_id, scopes: key.scopes, enabled: key.enabled, expires_at: key.expires_at });
  const lifecycle = { enabled: true, expires_at: null };
  assert.equal(got.body.result.length, 1);
  assert.deepEqual(sendgrids(got.body.result[0]), { name: 'node mailer', api_key_id: child.api_key_id, scopes: ['mail.send'], ...lifecycle });
  const listed = await call(sg, 'GET', '/v3/api_keys?limit=50');
  assert.ok(listed.body.result.some((k) => k.api_key_id === child.api_key_id));
  const put = await call(sg, 'PUT', `/v3/api_keys/${child.api_key_id}`, { name: 'node renamed', scopes: ['mail.send'] });
  assert.deepEqual(sendgrids(put.body), { api_key_id: child.api_key_id, name: 'node renamed', scopes: ['mail.send'], ...lifecycle });
  const patched = await call(sg, 'PATCH', `/v3/api_keys/${child.api_key_id}`, { name: 'node patched' });
  assert.deepEqual(patched.body, { api_key_id: child.api_key_id, name: 'node patched' });
  const own = await call(sg, 'GET', '/v3/scopes');
  assert.deepEqual([...own.body.scopes].sort(), [...scopes].sort());

  await refused(call(sg, 'POST', '/v3/api_keys', { name: 'x', scopes: ['no.such.scope'] }), 400, 'scopes');
  await refused(call(admin, 'POST', '/v3/api_keys', { name: 'x', scopes: ['billing.read', 'mail.send'] }), 400, 'scopes');
  await refused(call(sg, 'POST', '/v3/api_keys', { name: 'x', scopes: ['alerts.read'] }), 403);
  await refused(call(sg, 'GET', '/v3/api_keys/AAAAAAAAAAAAAAAAAAAAAA'), 404);
  await refused(call(client('SG.AAAAAAAAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'), 'GET', '/v3/scopes'), 401);
  await refused(call(client(ADMIN), 'GET', '/v3/api_keys'), 400, 'on-behalf-of');

  const revoked = await call(sg, 'DELETE', `/v3/api_keys/${child.api_key_id}`);
  assert.equal(revoked.status, 204);
  await refused(call(sg, 'GET', `/v3/api_keys/${child.api_key_id}`), 404);

  process.stdout.write(JSON.stringify({ allowed_mail_send: [manager.api_key], revoked: [child.api_key] }));
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
