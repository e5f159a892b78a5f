// keyward's API Keys console. Plain DOM, no framework, no build step.
//
// Security rules this file keeps (see docs/console.md):
// - Every string from the server is placed with textContent or as an
//   attribute value, never parsed as HTML (no innerHTML anywhere).
// - The credential lives in this page's memory only: never localStorage,
//   sessionStorage, a cookie or a URL. Reloading the page signs out.
// - A secret (a new key's, a rotated key's) is shown once and dropped as
//   soon as its screen is left.
// - The page only calls the REST API on its own origin; the server
//   enforces every rule again, and its errors are shown by the field
//   they name.
'use strict';

// --- state -----------------------------------------------------------------

const session = {
  credential: null, // Bearer credential: an API key or the admin token
  account: '', // with the admin token: the account (SendGrid's on-behalf-of)
  who: null, // GET /v3/scopes: { credential, account, api_key_id, scopes }
  held: new Set(), // the scopes the credential holds
  catalog: null, // GET /v3/scopes/catalog
};

// A secret to show once, with what it belongs to; cleared on any navigation.
let shownSecret = null;

// Page tokens of the list pages seen so far (for "Previous page").
let pages = [''];

// --- DOM helpers -----------------------------------------------------------

// Builds an element. `props`: attributes (strings), `on…` listeners,
// booleans as present/absent attributes. Children: nodes or strings
// (always text).
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else if (value === true) {
      el.setAttribute(name, '');
    } else {
      el.setAttribute(name, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

let uniqueId = 0;
function nextId(prefix) {
  uniqueId += 1;
  return `${prefix}-${uniqueId}`;
}

const main = () => document.getElementById('main');

// A status message survives the one navigation that follows it (a save
// that returns to the list), then clears.
let statusFresh = false;
function say(message) {
  document.getElementById('status').textContent = message;
  statusFresh = true;
}

function present(...nodes) {
  const m = main();
  m.replaceChildren(...nodes);
  m.removeAttribute('aria-busy');
  m.focus();
}

// Renders a screen of the signed-in console; a late answer arriving after
// sign-out (or after the user moved on: see `current`) draws nothing.
function show(...nodes) {
  if (session.who) present(...nodes);
}

// Each rendering's number: an asynchronous screen draws only while it is
// still the newest.
let renderSeq = 0;
function current(seq) {
  return seq === renderSeq && !!session.who;
}

// Runs `action` with `button` disabled, so a double click sends it once.
async function busy(button, action) {
  if (button.disabled) return;
  button.disabled = true;
  try {
    await action();
  } finally {
    button.disabled = false;
  }
}

function closeDialogs() {
  document.querySelectorAll('dialog').forEach((d) => d.remove());
}

// A labelled input. Returns { wrap, input, error }.
function field(label, input, hint) {
  const id = input.id || nextId('f');
  input.id = id;
  const error = h('p', { class: 'error', id: `${id}-error`, hidden: true });
  const hintEl = hint ? h('p', { class: 'hint', id: `${id}-hint` }, hint) : null;
  const described = [hintEl && hintEl.id].filter(Boolean).join(' ');
  if (described) input.setAttribute('aria-describedby', described);
  const wrap = h('div', { class: 'field' }, h('label', { for: id }, label), hintEl, input, error);
  return { wrap, input, error };
}

// A radio input with its label; a reason it is disabled goes beside the
// label (`wrap`), not in it, so the accessible name stays the level's.
function radio(name, value, label, props) {
  const input = h('input', { type: 'radio', name, value, ...props });
  const wrap = h('span', { class: 'choice' }, h('label', { class: 'radio' }, input, h('span', {}, label)));
  return { wrap, input };
}

// Shows a server error next to the element it names, or in `fallback`.
function showError(slots, fallback, err) {
  for (const slot of Object.values(slots)) clearError(slot);
  clearError(fallback);
  const slot = (err.field && slots[err.field]) || (err.field && slots[err.field.split('.')[0]]) || fallback;
  slot.error.textContent = err.message;
  slot.error.hidden = false;
  // An error inside a closed disclosure would not be seen.
  const details = slot.error.closest('details');
  if (details) details.open = true;
  if (slot.input) {
    slot.input.setAttribute('aria-invalid', 'true');
    const ids = (slot.input.getAttribute('aria-describedby') || '').split(' ').filter(Boolean);
    if (!ids.includes(slot.error.id)) ids.push(slot.error.id);
    slot.input.setAttribute('aria-describedby', ids.join(' '));
    slot.input.focus();
  }
}

function clearError(slot) {
  if (!slot || !slot.error) return;
  slot.error.hidden = true;
  slot.error.textContent = '';
  if (slot.input) slot.input.removeAttribute('aria-invalid');
}

// An error slot not tied to one input (a form's own).
function formError() {
  return { error: h('p', { class: 'error', role: 'alert', id: nextId('err'), hidden: true }), input: null };
}

// --- the REST API ----------------------------------------------------------

class ApiError extends Error {
  constructor(status, field, message) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${session.credential}` };
  if (session.account) headers['on-behalf-of'] = session.account;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'omit',
      cache: 'no-store',
      referrerPolicy: 'no-referrer',
    });
  } catch (e) {
    throw new ApiError(0, null, 'keyward did not answer; check that it is running and try again');
  }
  if (response.status === 204) return null;
  let json = null;
  try {
    json = await response.json();
  } catch (e) {
    json = null;
  }
  if (!response.ok) {
    const first = json && Array.isArray(json.errors) && json.errors[0];
    const message = first && typeof first.message === 'string' ? first.message : `the server answered ${response.status}`;
    const err = new ApiError(response.status, first && first.field, message);
    if (response.status === 401 && session.who) {
      // The credential stopped working (revoked, disabled, expired).
      signOut(`Signed out: ${message}`);
    }
    throw err;
  }
  return json;
}

// --- scopes and levels -----------------------------------------------------

const LEVEL_LABELS = { none: 'No Access', read: 'Read Access', full: 'Full Access' };

// The scopes a category grants at `level`.
function levelScopes(category, level) {
  switch (level) {
    case 'none':
      return [];
    case 'read':
      return category.scopes.filter((s) => s.access === 'read').map((s) => s.name);
    case 'write':
      return category.scopes.filter((s) => s.access === 'write').map((s) => s.name);
    default:
      return category.scopes.map((s) => s.name);
  }
}

function missingOf(scopes) {
  return scopes.filter((s) => !session.held.has(s));
}

function generalScopes() {
  return session.catalog.categories.filter((c) => !c.exclusive).flatMap((c) => c.scopes.map((s) => s.name));
}

function uniq(list) {
  return [...new Set(list)];
}

function can(scope) {
  return session.held.has(scope);
}

// Why a control is disabled, in words.
function lacking(missing) {
  const shown = missing.slice(0, 3).join(', ');
  const more = missing.length > 3 ? ` and ${missing.length - 3} more` : '';
  return `You cannot grant this: your credential lacks ${shown}${more}.`;
}

function kindLabel(kind) {
  return { full_access: 'Full Access', restricted_access: 'Restricted Access', billing_access: 'Billing Access' }[kind] || kind;
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return '';
  return new Date(seconds * 1000).toISOString().replace('T', ' ').replace(/:\d\d\.\d+Z$/, ' UTC');
}

// --- sign in / out ---------------------------------------------------------

function signOut(message) {
  session.credential = null;
  session.account = '';
  session.who = null;
  session.held = new Set();
  session.catalog = null;
  shownSecret = null;
  pages = [''];
  closeDialogs();
  document.getElementById('who').textContent = '';
  document.getElementById('sign-out').hidden = true;
  if (location.hash !== '' && location.hash !== '#/') {
    history.replaceState(null, '', '#/');
  }
  render();
  if (message) say(message);
}

function signInScreen() {
  const credential = field('API key or admin token', h('input', { type: 'password', autocomplete: 'off', required: true, spellcheck: 'false' }));
  const account = field(
    'Account',
    h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false' }),
    "With the admin token: the account to manage (SendGrid's on-behalf-of). Leave empty with an API key.",
  );
  const general = formError();
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const slots = { authorization: credential, 'on-behalf-of': account };
  const form = h(
    'form',
    {
      class: 'panel',
      novalidate: true,
      'aria-labelledby': 'sign-in-title',
      onsubmit: async (event) => {
        event.preventDefault();
        submit.disabled = true;
        try {
          await signIn(credential.input.value.trim(), account.input.value.trim(), slots, general);
        } finally {
          submit.disabled = false;
        }
      },
    },
    h('h1', { id: 'sign-in-title' }, 'Sign in'),
    h('p', {}, 'Manage API keys with an API key that holds api_keys permissions, or with the operator\'s admin token and an account.'),
    credential.wrap,
    account.wrap,
    general.error,
    h('div', { class: 'actions' }, submit),
  );
  present(form);
  credential.input.focus();
}

async function signIn(credential, account, slots, general) {
  if (!credential) {
    showError(slots, general, { field: 'authorization', message: 'API key or admin token: required' });
    return;
  }
  session.credential = credential;
  session.account = account;
  try {
    const who = await api('GET', '/v3/scopes');
    if (who.credential === 'admin' && !account) {
      throw new ApiError(400, 'on-behalf-of', 'Account: required with the admin token (the account whose keys to manage)');
    }
    session.catalog = await api('GET', '/v3/scopes/catalog');
    session.who = who;
    session.held = new Set(who.scopes);
    // Checks the account before showing anything.
    if (can('api_keys.read')) await api('GET', '/v3/api_keys?limit=1');
  } catch (err) {
    session.credential = null;
    session.who = null;
    session.catalog = null;
    const e = err.status === 401 ? { field: 'authorization', message: err.message } : err;
    showError(slots, general, e);
    return;
  }
  const whoText = session.who.credential === 'admin' ? `Admin, for account ${account}` : `API key ${session.who.api_key_id}, account ${session.who.account}`;
  document.getElementById('who').textContent = whoText;
  document.getElementById('sign-out').hidden = false;
  pages = [''];
  if (location.hash === '#/' || location.hash === '') render();
  else location.hash = '#/';
}

// --- the list --------------------------------------------------------------

async function listScreen(seq) {
  const title = h('h1', {}, 'API Keys');
  const create = h(
    'button',
    { type: 'button', class: 'primary', disabled: !can('api_keys.create'), onclick: () => { location.hash = '#/create'; } },
    'Create API Key',
  );
  const why = can('api_keys.create') ? null : h('span', { class: 'why' }, 'Your credential lacks api_keys.create.');
  if (!can('api_keys.read')) {
    show(title, h('div', { class: 'actions' }, create, why), h('p', {}, 'Your credential lacks api_keys.read, so it cannot list keys.'));
    return;
  }
  const token = pages[pages.length - 1];
  let page;
  try {
    page = await api('GET', `/v3/api_keys?limit=20${token ? `&page_token=${encodeURIComponent(token)}` : ''}`);
  } catch (err) {
    if (current(seq)) show(title, h('p', { class: 'error', role: 'alert' }, err.message));
    return;
  }
  if (!current(seq)) return;
  const rows = page.result.map((key) => keyRow(key));
  const table = h(
    'table',
    {},
    h('caption', { class: 'hint' }, `Keys of this account${pages.length > 1 ? ` (page ${pages.length})` : ''}`),
    h('thead', {}, h('tr', {}, ['Name', 'API Key ID', 'Kind', 'Status', 'Expires', 'Last used', 'Actions'].map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, rows.length ? rows : h('tr', {}, h('td', { colspan: 7 }, 'No API keys yet.'))),
  );
  const pager = h(
    'div',
    { class: 'pager' },
    pages.length > 1 ? h('button', { type: 'button', onclick: (e) => { e.currentTarget.disabled = true; pages.pop(); render(); } }, 'Previous page') : null,
    page.next_page_token ? h('button', { type: 'button', onclick: (e) => { e.currentTarget.disabled = true; pages.push(page.next_page_token); render(); } }, 'Next page') : null,
  );
  show(title, h('div', { class: 'actions' }, create, why), h('div', { class: 'panel' }, table, pager));
}

// Where a key's secret was found in public (GitHub's secret scanning), in
// words; null when never. The URL stays text: it is the finder's, not ours.
function leakNote(key) {
  const leak = key.leak;
  if (!leak) return null;
  const where = leak.url ? `at ${leak.url}` : 'in public';
  const on = `on ${when(leak.reported_at)}`;
  if (leak.previous_secret) return `Its previous secret was found ${where} ${on}; that secret was stopped at once.`;
  if (key.enabled) return `Its secret was found ${where} ${on}: rotate it.`;
  return `Disabled because its secret was found ${where} ${on}. Rotate it; then the admin can enable it.`;
}

function statusOf(key) {
  if (key.expired) return h('span', { class: 'badge expired' }, 'expired');
  if (key.leak && !key.leak.previous_secret) {
    return h('span', { class: 'leak' }, h('span', { class: 'badge leaked' }, key.enabled ? 'leaked' : 'disabled: leaked'), h('span', { class: 'hint' }, ` ${leakNote(key)}`));
  }
  if (!key.enabled) return h('span', { class: 'badge disabled' }, 'disabled');
  return h('span', { class: 'badge' }, 'enabled');
}

function keyRow(key) {
  return h(
    'tr',
    { 'data-key-id': key.api_key_id },
    h('td', {}, key.name),
    h('td', { class: 'id' }, key.api_key_id),
    h('td', {}, kindLabel(key.kind)),
    h('td', {}, statusOf(key)),
    h('td', {}, key.expires_at ? when(key.expires_at) : 'never'),
    h('td', {}, key.last_used_at ? when(key.last_used_at) : 'never'),
    h('td', {}, actionsMenu(key)),
  );
}

// The row's Actions button and its menu (a WAI-ARIA menu button).
function actionsMenu(key) {
  const update = can('api_keys.update');
  const rotate = update && can('api_keys.create');
  const items = [
    ['Edit', update, () => { location.hash = `#/keys/${encodeURIComponent(key.api_key_id)}/edit`; }],
    ['Delete', can('api_keys.delete'), () => deleteDialog(key)],
    key.enabled ? ['Disable', update, () => setEnabled(key, false)] : ['Enable', update, () => setEnabled(key, true)],
    ['Rotate', rotate, () => rotateDialog(key)],
    ['Expiry', update, () => lifecycleDialog(key, 'Expiry')],
    ['Allowlist', update, () => lifecycleDialog(key, 'Allowlist')],
    ['Rate limit', update, () => lifecycleDialog(key, 'Rate limit')],
    ['Credits', update, () => lifecycleDialog(key, 'Credits')],
  ];
  const menuId = nextId('menu');
  const button = h('button', { type: 'button', 'aria-haspopup': 'menu', 'aria-expanded': 'false', 'aria-controls': menuId }, 'Actions');
  const menu = h('ul', { role: 'menu', id: menuId, 'aria-label': `Actions for ${key.name}`, hidden: true });
  const buttons = items.map(([label, allowed, action]) => {
    const item = h('button', {
      type: 'button',
      role: 'menuitem',
      tabindex: '-1',
      disabled: !allowed,
      title: allowed ? null : 'Your credential lacks the api_keys permission this needs',
      onclick: () => { close(); action(); },
    }, label);
    menu.append(h('li', { role: 'none' }, item));
    return item;
  });
  const enabled = () => buttons.filter((b) => !b.disabled);
  function open() {
    document.querySelectorAll('[role=menu]:not([hidden])').forEach((m) => m.dispatchEvent(new Event('close')));
    menu.hidden = false;
    button.setAttribute('aria-expanded', 'true');
    const first = enabled()[0];
    if (first) first.focus();
  }
  function close(refocus) {
    menu.hidden = true;
    button.setAttribute('aria-expanded', 'false');
    if (refocus) button.focus();
  }
  menu.addEventListener('close', () => close(false));
  button.addEventListener('click', () => (menu.hidden ? open() : close(true)));
  button.addEventListener('keydown', (e) => {
    if (e.key === 'ArrowDown') { e.preventDefault(); open(); }
  });
  menu.addEventListener('keydown', (e) => {
    const list = enabled();
    const at = list.indexOf(document.activeElement);
    if (e.key === 'Escape') { e.preventDefault(); close(true); }
    else if (e.key === 'ArrowDown') { e.preventDefault(); list[(at + 1) % list.length].focus(); }
    else if (e.key === 'ArrowUp') { e.preventDefault(); list[(at - 1 + list.length) % list.length].focus(); }
    else if (e.key === 'Tab') close(false);
  });
  return h('div', { class: 'menu-wrap' }, button, menu);
}

document.addEventListener('click', (e) => {
  if (!e.target.closest('.menu-wrap')) {
    document.querySelectorAll('[role=menu]:not([hidden])').forEach((m) => m.dispatchEvent(new Event('close')));
  }
});

async function setEnabled(key, enabled) {
  try {
    await api('POST', `/v3/api_keys/${encodeURIComponent(key.api_key_id)}/${enabled ? 'enable' : 'disable'}`);
    say(`${enabled ? 'Enabled' : 'Disabled'} ${key.name}.`);
  } catch (err) {
    say(err.message);
  }
  render();
}

// A modal dialog; closing it (Escape, Cancel, Close) drops its contents.
function dialog(titleText, ...content) {
  const title = h('h2', { id: nextId('dlg') }, titleText);
  const dlg = h('dialog', { 'aria-labelledby': title.id }, title, ...content);
  dlg.addEventListener('close', () => {
    dlg.remove();
    render();
  });
  document.body.append(dlg);
  dlg.showModal();
  return dlg;
}

function deleteDialog(key) {
  const general = formError();
  const confirm = h('button', { type: 'button', class: 'danger' }, 'Confirm');
  const dlg = dialog(
    'Delete API Key',
    h('p', {}, 'Are you sure you want to delete ', h('strong', {}, key.name), '? Any subsequent API calls using this key will be rejected. This cannot be undone.'),
    general.error,
    h('div', { class: 'actions' }, confirm, h('button', { type: 'button', onclick: () => dlg.close() }, 'Cancel')),
  );
  confirm.addEventListener('click', () => busy(confirm, async () => {
    try {
      await api('DELETE', `/v3/api_keys/${encodeURIComponent(key.api_key_id)}`);
      say(`Deleted ${key.name}.`);
      dlg.close();
    } catch (err) {
      showError({}, general, err);
    }
  }));
  confirm.focus();
}

// The secret, shown once, with its warning and a Copy button.
function secretPanel(secret) {
  const out = h('input', { type: 'text', readonly: true, class: 'secret', value: secret, 'aria-label': 'API key secret', spellcheck: 'false' });
  const copied = h('span', { role: 'status', class: 'hint' });
  const copy = h('button', {
    type: 'button',
    onclick: async () => {
      out.select();
      try {
        await navigator.clipboard.writeText(secret);
        copied.textContent = 'Copied.';
      } catch (e) {
        copied.textContent = 'Press Ctrl+C (or ⌘C) to copy the selected key.';
      }
    },
  }, 'Copy');
  return h(
    'div',
    { class: 'secret-panel' },
    h('p', { class: 'warning' }, 'Please copy this key and store it somewhere safe. For security reasons, it will not be shown again.'),
    h('div', { class: 'actions' }, out, copy, copied),
  );
}

function rotateDialog(key) {
  const overlap = field('Overlap (seconds)', h('input', { type: 'number', min: '0', max: '2592000', value: '3600' }), 'How long the current secret keeps working after the rotation (0 to 30 days).');
  const general = formError();
  const slots = { overlap_seconds: overlap };
  const rotate = h('button', { type: 'submit', class: 'primary' }, 'Rotate');
  const form = h('form', {
    novalidate: true,
    onsubmit: (event) => {
      event.preventDefault();
      busy(rotate, () => doRotate());
    },
  }, overlap.wrap, general.error, h('div', { class: 'actions' }, rotate, h('button', { type: 'button', onclick: () => dlg.close() }, 'Cancel')));
  async function doRotate() {
      try {
        const reply = await api('POST', `/v3/api_keys/${encodeURIComponent(key.api_key_id)}/rotate`, { overlap_seconds: Number(overlap.input.value || 0) });
        const until = reply.previous_secret_valid_until ? `The previous secret works until ${when(reply.previous_secret_valid_until)}.` : 'The previous secret no longer works.';
        form.replaceWith(h('div', {}, h('p', {}, until), secretPanel(reply.api_key), h('div', { class: 'actions' }, h('button', { type: 'button', onclick: () => dlg.close() }, 'Close'))));
        say(`Rotated ${key.name}.`);
      } catch (err) {
        showError(slots, general, err);
      }
  }
  const dlg = dialog(`Rotate ${key.name}`, form);
  overlap.input.focus();
}

// The lifecycle settings as small forms: Expiry, Allowlist, Rate limit, Credits.
// `detail` is the key as read (for current values); `done` runs after a save.
function lifecycleForm(kind, id, detail, done) {
  const general = formError();
  let slots;
  let payload;
  let path;
  let fields;
  if (kind === 'Expiry') {
    const at = field('Expires at (UTC)', h('input', { type: 'datetime-local', step: '1' }), 'The key stops working at this time.');
    const never = h('input', { type: 'checkbox', id: nextId('never') });
    if (detail && detail.expires_at) at.input.value = new Date(detail.expires_at * 1000).toISOString().slice(0, 19);
    else never.checked = true;
    // Entering a time means the key expires; "Never" clears the time.
    at.input.addEventListener('input', () => { never.checked = !at.input.value; });
    never.addEventListener('change', () => { if (never.checked) at.input.value = ''; });
    fields = [at.wrap, h('label', { class: 'radio', for: never.id }, never, h('span', {}, 'Never expires'))];
    slots = { expires_at: at };
    path = 'expiry';
    payload = () => ({ expires_at: never.checked || !at.input.value ? null : Math.floor(Date.parse(`${at.input.value}Z`) / 1000) });
  } else if (kind === 'Allowlist') {
    const cidrs = field('Allowed addresses', h('textarea', { spellcheck: 'false' }), 'One address or CIDR range per line (e.g. 10.0.0.0/8). Empty: any address.');
    if (detail) cidrs.input.value = detail.allowed_cidrs.join('\n');
    fields = [cidrs.wrap];
    slots = { allowed_cidrs: cidrs };
    path = 'allowlist';
    payload = () => ({ allowed_cidrs: cidrs.input.value.split(/\s+/).filter(Boolean) });
  } else if (kind === 'Credits') {
    const remaining = field('Remaining', h('input', { type: 'number', min: '0' }), 'Allowed requests left; each allowed request spends one.');
    const amount = field('Refill to', h('input', { type: 'number', min: '1' }), 'Optional: every period, the remaining credits are set to this (unused ones do not carry over).');
    const every = field('Refill every (seconds)', h('input', { type: 'number', min: '1', value: '86400' }));
    const none = h('input', { type: 'checkbox', id: nextId('nocredits') });
    const credits = detail && detail.credits;
    if (credits) {
      remaining.input.value = credits.remaining;
      if (credits.refill) {
        amount.input.value = credits.refill.amount;
        every.input.value = credits.refill.period_seconds;
      }
    } else none.checked = !!detail;
    for (const f of [remaining, amount, every]) f.input.addEventListener('input', () => { none.checked = false; });
    const next = credits && credits.next_refill_at ? h('p', { class: 'hint' }, `Next refill ${when(credits.next_refill_at)}.`) : null;
    fields = [h('label', { class: 'radio', for: none.id }, none, h('span', {}, 'Unlimited (no credits)')), remaining.wrap, amount.wrap, every.wrap, next];
    slots = { 'credits.remaining': remaining, 'credits.refill.amount': amount, 'credits.refill.period_seconds': every, credits: remaining };
    path = 'credits';
    payload = () => ({
      credits: none.checked ? null : {
        remaining: Number(remaining.input.value),
        refill: amount.input.value ? { amount: Number(amount.input.value), period_seconds: Number(every.input.value) } : null,
      },
    });
  } else {
    const requests = field('Requests', h('input', { type: 'number', min: '1' }));
    const period = field('Period (ms)', h('input', { type: 'number', min: '1', value: '1000' }));
    const burst = field('Burst', h('input', { type: 'number', min: '0', value: '0' }), '0: the whole period\'s requests at once.');
    const none = h('input', { type: 'checkbox', id: nextId('nolimit') });
    const limit = detail && detail.rate_limit;
    if (limit) {
      requests.input.value = limit.requests;
      period.input.value = limit.period_ms;
      burst.input.value = limit.burst;
    } else none.checked = !!detail;
    // Typing a limit means having one.
    for (const f of [requests, period, burst]) f.input.addEventListener('input', () => { none.checked = false; });
    fields = [h('label', { class: 'radio', for: none.id }, none, h('span', {}, 'No rate limit')), requests.wrap, period.wrap, burst.wrap];
    slots = { 'rate_limit.requests': requests, 'rate_limit.period_ms': period, 'rate_limit.burst': burst, rate_limit: requests };
    path = 'rate_limit';
    payload = () => ({
      rate_limit: none.checked ? null : { requests: Number(requests.input.value), period_ms: Number(period.input.value), burst: Number(burst.input.value || 0) },
    });
  }
  const save = h('button', { type: 'submit', class: 'primary' }, `Save ${kind.toLowerCase()}`);
  const form = h('form', {
    'aria-label': kind,
    novalidate: true,
    onsubmit: (event) => {
      event.preventDefault();
      busy(save, async () => {
        try {
          await api('PUT', `/v3/api_keys/${encodeURIComponent(id)}/${path}`, payload());
          for (const slot of Object.values(slots)) clearError(slot);
          clearError(general);
          say(`Saved the ${kind.toLowerCase()}.`);
          if (done) done();
        } catch (err) {
          showError(slots, general, err);
        }
      });
    },
  }, ...fields, general.error, h('div', { class: 'actions' }, save));
  return form;
}

async function lifecycleDialog(key, kind) {
  let detail = null;
  if (can('api_keys.read')) {
    try {
      detail = (await api('GET', `/v3/api_keys/${encodeURIComponent(key.api_key_id)}`)).result[0];
    } catch (err) {
      say(err.message);
    }
  }
  if (!session.who) return;
  const form = lifecycleForm(kind, key.api_key_id, detail, () => dlg.close());
  const dlg = dialog(`${kind}: ${key.name}`, form, h('div', { class: 'actions' }, h('button', { type: 'button', onclick: () => dlg.close() }, 'Cancel')));
  const first = form.querySelector('input, textarea');
  if (first) first.focus();
}

// --- create and edit -------------------------------------------------------

// The permissions picker: kind radios, then a fieldset per category with
// its offered levels and (inside a disclosure) its individual scopes.
// Returns { element, scopes(): string[] | null (null: Full Access), slot }.
function permissions(initial) {
  const catalog = session.catalog;
  const group = nextId('kind');
  const full = radio(group, 'full', 'Full Access');
  const restricted = radio(group, 'restricted', 'Restricted Access');
  const billing = radio(group, 'billing', 'Billing Access');
  const fullMissing = missingOf(generalScopes());
  if (fullMissing.length) {
    full.input.disabled = true;
    full.wrap.append(h('span', { class: 'why' }, lacking(fullMissing)));
  }
  const chosen = new Set(initial ? initial.scopes : []);
  const kindOf = initial ? initial.kind : 'restricted_access';
  ({ full_access: full, restricted_access: restricted, billing_access: billing }[kindOf] || restricted).input.checked = true;
  if (kindOf === 'full_access' && !initial) chosen.clear();

  const general = h('div', { class: 'categories' });
  const billingBox = h('div', { class: 'categories' });
  // A scope may sit in several categories (Clients' stats are Stats' too):
  // its checkboxes move together, and every category's level follows.
  const reflectors = [];
  const shared = {
    set(container, name, on) {
      for (const box of container.querySelectorAll(`input[type=checkbox][data-scope="${CSS.escape(name)}"]`)) box.checked = on;
    },
    reflectAll() {
      for (const reflect of reflectors) reflect();
    },
    add(reflect) {
      reflectors.push(reflect);
    },
  };
  for (const category of catalog.categories) {
    (category.exclusive ? billingBox : general).append(categoryFieldset(category, chosen, shared));
  }
  const error = h('p', { class: 'error', id: nextId('perm-err'), hidden: true });
  const fieldset = h(
    'fieldset',
    { 'aria-describedby': error.id },
    h('legend', {}, 'API Key Permissions'),
    full.wrap,
    restricted.wrap,
    billing.wrap,
    error,
    h('p', { class: 'hint', 'data-for': 'full' }, 'Full Access: every permission except billing.'),
    general,
    billingBox,
  );
  function sync() {
    const kind = [full, restricted, billing].find((r) => r.input.checked).input.value;
    general.hidden = kind !== 'restricted';
    billingBox.hidden = kind !== 'billing';
    fieldset.querySelector('[data-for=full]').hidden = kind !== 'full';
  }
  for (const r of [full, restricted, billing]) r.input.addEventListener('change', sync);
  sync();
  return {
    element: fieldset,
    slot: { error, input: null, fieldset },
    scopes() {
      const kind = [full, restricted, billing].find((r) => r.input.checked).input.value;
      if (kind === 'full') return null;
      const box = kind === 'billing' ? billingBox : general;
      return uniq([...box.querySelectorAll('input[type=checkbox][data-scope]:checked')].map((c) => c.dataset.scope));
    },
  };
}

function categoryFieldset(category, chosen, shared) {
  const group = nextId(`level-${category.id}`);
  const descId = nextId('desc');
  const boxes = category.scopes.map((scope) => {
    const missing = missingOf([scope.name]);
    const box = h('input', { type: 'checkbox', 'data-scope': scope.name, checked: chosen.has(scope.name), disabled: missing.length > 0 && !chosen.has(scope.name) });
    return { box, label: h('span', { class: 'choice' }, h('label', {}, box, ` ${scope.name}`), missing.length ? h('span', { class: 'why' }, 'not held by your credential') : null) };
  });
  const levels = category.levels.filter((l) => LEVEL_LABELS[l]).map((level) => {
    const scopes = levelScopes(category, level);
    const missing = missingOf(scopes);
    const r = radio(group, level, LEVEL_LABELS[level], { disabled: missing.length > 0 });
    if (missing.length) {
      const why = h('span', { class: 'why', id: nextId('why') }, lacking(missing));
      r.input.setAttribute('aria-describedby', why.id);
      r.wrap.append(why);
    }
    r.input.addEventListener('change', () => {
      const set = new Set(scopes);
      for (const { box } of boxes) shared.set(fieldset.parentElement, box.dataset.scope, set.has(box.dataset.scope));
      shared.reflectAll();
    });
    return { level, scopes, r };
  });
  const custom = h('span', { class: 'hint', hidden: true }, 'Custom: individual scopes chosen below.');
  function reflect() {
    const on = new Set(boxes.filter(({ box }) => box.checked).map(({ box }) => box.dataset.scope));
    const match = levels.find(({ scopes }) => scopes.length === on.size && scopes.every((s) => on.has(s)));
    for (const { r } of levels) r.input.checked = match ? r === match.r : false;
    custom.hidden = !!match;
  }
  for (const { box } of boxes) {
    box.addEventListener('change', () => {
      shared.set(fieldset.parentElement, box.dataset.scope, box.checked);
      shared.reflectAll();
    });
  }
  reflect();
  shared.add(reflect);
  const fieldset = h(
    'fieldset',
    { 'data-category': category.id, 'aria-describedby': descId },
    h('legend', {}, category.title),
    h('p', { class: 'hint', id: descId }, category.description),
    levels.map(({ r }) => r.wrap),
    custom,
    h('details', {}, h('summary', {}, `Choose individual ${category.title} scopes`), h('div', { class: 'scopes' }, boxes.map(({ label }) => label))),
  );
  return fieldset;
}

function keyForm({ title, initial, submitLabel, submit, extra, after }) {
  const name = field('API Key Name', h('input', { type: 'text', maxlength: '100', required: true, autocomplete: 'off', value: initial ? initial.name : '' }));
  const perms = permissions(initial);
  const general = formError();
  const slots = { name, scopes: perms.slot, access: perms.slot };
  const extras = extra ? extra(slots) : [];
  const button = h('button', { type: 'submit', class: 'primary' }, submitLabel);
  const form = h(
    'form',
    {
      class: 'panel',
      novalidate: true,
      onsubmit: async (event) => {
        event.preventDefault();
        button.disabled = true;
        try {
          await submit({ name: name.input.value, scopes: perms.scopes() }, slots, general);
        } catch (err) {
          showError(slots, general, err);
          if (perms.slot.fieldset && slots[err.field] === perms.slot) perms.slot.fieldset.scrollIntoView();
        } finally {
          button.disabled = false;
        }
      },
    },
    name.wrap,
    perms.element,
    ...extras,
    general.error,
    h('div', { class: 'actions' }, button, h('button', { type: 'button', onclick: () => { location.hash = '#/'; } }, 'Cancel')),
  );
  show(h('h1', {}, title), form, ...(after || []));
  name.input.focus();
}

function createScreen() {
  let lifecycle = () => ({});
  keyForm({
    title: 'Create API Key',
    submitLabel: 'Create & View',
    extra: (slots) => {
      const expires = field('Expires at (UTC)', h('input', { type: 'datetime-local', step: '1' }), 'Optional: the key stops working at this time.');
      const cidrs = field('Allowed addresses', h('textarea', { spellcheck: 'false' }), 'Optional: one address or CIDR range per line. Empty: any address.');
      const requests = field('Rate limit: requests', h('input', { type: 'number', min: '1' }), 'Optional: requests per period.');
      const period = field('Rate limit: period (ms)', h('input', { type: 'number', min: '1', value: '1000' }));
      Object.assign(slots, { expires_at: expires, allowed_cidrs: cidrs, 'rate_limit.requests': requests, rate_limit: requests, 'rate_limit.period_ms': period });
      lifecycle = () => ({
        expires_at: expires.input.value ? Math.floor(Date.parse(`${expires.input.value}Z`) / 1000) : undefined,
        allowed_cidrs: cidrs.input.value.split(/\s+/).filter(Boolean),
        rate_limit: requests.input.value ? { requests: Number(requests.input.value), period_ms: Number(period.input.value) } : undefined,
      });
      return [h('details', {}, h('summary', {}, 'Optional limits: expiry, allowed addresses, rate limit'), expires.wrap, cidrs.wrap, requests.wrap, period.wrap)];
    },
    submit: async ({ name, scopes }) => {
      const body = { name, ...lifecycle() };
      if (scopes !== null) body.scopes = scopes;
      const reply = await api('POST', '/v3/api_keys', body);
      shownSecret = { secret: reply.api_key, name: reply.name, id: reply.api_key_id };
      location.hash = '#/created';
    },
  });
}

function createdScreen(secret) {
  if (!secret) {
    show(h('h1', {}, 'API Key Created'), h('p', {}, 'The secret was shown once and is gone. Rotate the key for a new one.'), h('button', { type: 'button', onclick: () => { location.hash = '#/'; } }, 'Back to API Keys'));
    return;
  }
  show(
    h('h1', {}, 'API Key Created'),
    h('div', { class: 'panel' }, h('p', {}, 'Your API key ', h('strong', {}, secret.name), ' (', h('code', {}, secret.id), ') is ready.'), secretPanel(secret.secret), h('div', { class: 'actions' }, h('button', { type: 'button', class: 'primary', onclick: () => { location.hash = '#/'; } }, 'Done'))),
  );
}

async function editScreen(id, seq) {
  let key;
  try {
    key = (await api('GET', `/v3/api_keys/${encodeURIComponent(id)}`)).result[0];
  } catch (err) {
    if (current(seq)) show(h('h1', {}, 'Edit API Key'), h('p', { class: 'error', role: 'alert' }, err.message));
    return;
  }
  if (!current(seq)) return;
  keyForm({
    title: `Edit API Key: ${key.name}`,
    initial: key,
    submitLabel: 'Save',
    after: [
      h('h2', {}, 'Lifecycle'),
      h('p', { class: 'hint' }, `Status: ${key.expired ? 'expired' : key.enabled ? 'enabled' : 'disabled'}. Created ${when(key.created_at)}; last used ${key.last_used_at ? when(key.last_used_at) : 'never'}.`),
      key.leak ? h('p', { class: 'error', role: 'alert' }, leakNote(key)) : null,
      h('div', { class: 'panel' }, h('h2', {}, 'Expiry'), lifecycleForm('Expiry', key.api_key_id, key, null)),
      h('div', { class: 'panel' }, h('h2', {}, 'Allowlist'), lifecycleForm('Allowlist', key.api_key_id, key, null)),
      h('div', { class: 'panel' }, h('h2', {}, 'Rate limit'), lifecycleForm('Rate limit', key.api_key_id, key, null)),
      h('div', { class: 'panel' }, h('h2', {}, 'Credits'), lifecycleForm('Credits', key.api_key_id, key, null)),
      usagePanel(key.api_key_id),
    ],
    submit: async ({ name, scopes }) => {
      await api('PUT', `/v3/api_keys/${encodeURIComponent(key.api_key_id)}`, { name, scopes: scopes === null ? generalScopes() : scopes });
      say(`Saved ${name}.`);
      location.hash = '#/';
    },
  });
}

// --- usage -----------------------------------------------------------------

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  for (const child of children) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

// A key's usage: totals, and one stacked bar per bucket (allowed below,
// denied above), every sidecar summed. The numbers are also in the
// totals line, so the chart is not the only way to read them.
function usagePanel(id) {
  const chart = h('div', { class: 'usage-chart' });
  const totals = h('p', { class: 'hint', 'aria-live': 'polite' }, 'Loading usage…');
  const range = h('select', { id: nextId('range') },
    ...[['1h', 'Last hour (by minute)'], ['24h', 'Last 24 hours'], ['7d', 'Last 7 days'], ['30d', 'Last 30 days']]
      .map(([value, label]) => h('option', { value }, label)));
  async function load() {
    try {
      const usage = await api('GET', `/v3/api_keys/${encodeURIComponent(id)}/usage?range=${range.value}`);
      const reasons = Object.entries(usage.totals.denied_by_reason).map(([r, n]) => `${n} ${r.replace(/_/g, ' ')}`);
      totals.textContent = `${usage.totals.allowed} allowed, ${usage.totals.denied} denied${reasons.length ? ` (${reasons.join(', ')})` : ''}, over every sidecar.`;
      chart.replaceChildren(usageChart(usage));
    } catch (err) {
      totals.textContent = err.status === 400 ? `Usage is not kept here: ${err.message}` : `Usage could not be read: ${err.message}`;
      chart.replaceChildren();
    }
  }
  range.addEventListener('change', load);
  load();
  return h('div', { class: 'panel' }, h('h2', {}, 'Usage'), field('Range', range).wrap, totals, chart);
}

function usageChart(usage) {
  const width = 600;
  const height = 120;
  const series = usage.series;
  const most = Math.max(1, ...series.map((b) => b.allowed + b.denied));
  const step = width / Math.max(1, series.length);
  const bars = [];
  series.forEach((bucket, i) => {
    const allowed = (bucket.allowed / most) * height;
    const denied = (bucket.denied / most) * height;
    const at = new Date(bucket.start * 1000).toISOString().slice(0, 16).replace('T', ' ');
    const title = svg('title', {}, `${at} UTC: ${bucket.allowed} allowed, ${bucket.denied} denied`);
    bars.push(svg('g', {}, title,
      svg('rect', { class: 'allowed', x: i * step, y: height - allowed, width: Math.max(1, step - 1), height: allowed }),
      svg('rect', { class: 'denied', x: i * step, y: height - allowed - denied, width: Math.max(1, step - 1), height: denied })));
  });
  return svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': `Requests by ${usage.bucket}: allowed and denied (most in one ${usage.bucket}: ${most})` }, ...bars);
}

// --- routing ---------------------------------------------------------------

let rendered = null;

function render() {
  const route = location.hash || '#/';
  if (rendered !== route) {
    // Leaving a screen forgets any secret it showed.
    const secret = route === '#/created' ? shownSecret : null;
    shownSecret = null;
    rendered = route;
    // A dialog (and any secret in it) belongs to the screen it opened on.
    closeDialogs();
    if (statusFresh) statusFresh = false;
    else document.getElementById('status').textContent = '';
    renderRoute(route, secret);
    return;
  }
  renderRoute(route, null);
}

function renderRoute(route, secret) {
  renderSeq += 1;
  const seq = renderSeq;
  // Loading until the screen is drawn (assistive technology announces it).
  main().setAttribute('aria-busy', 'true');
  if (!session.credential || !session.who) {
    signInScreen();
    return;
  }
  const edit = route.match(/^#\/keys\/([^/]+)\/edit$/);
  if (route === '#/create') createScreen();
  else if (route === '#/created') createdScreen(secret);
  else if (edit) editScreen(decodeURIComponent(edit[1]), seq);
  else listScreen(seq);
}

window.addEventListener('hashchange', render);
document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('sign-out').addEventListener('click', () => signOut('Signed out.'));
  render();
});
